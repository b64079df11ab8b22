"""A small fleet agent: real simulated workers and a real router for the pods of one InferenceService.

KWOK pods become Running/Ready but run no containers. For closed-loop tests (and ``make demo``)
this agent stands in for the kubelet of ``engine: sim`` pools: every Ready worker pod of the
service (labels ``inference.tandem.dev/service=<name>`` and ``inference.tandem.dev/role``) gets
one ``tandem-sim-worker`` process on a free loopback port, started with the command line the
operator wrote into the pod (role, model, accelerator, tensor parallelism) plus ``--host
127.0.0.1 --port <free> --time-scale S``; the process is stopped when its pod goes away or
stops being Ready. Each pool's workers are registered with Prometheus (file_sd) with the labels
the planner's queries expect: ``namespace``, ``service``, ``pool``, ``role``.

With ``kv_sidecars=True`` it also runs the pod's ``kv-sidecar`` container: a real
``python -m tandem.sidecar`` (NIXL over UCX) per pod on its own loopback port, with the env the
operator wrote into the container, and points the worker at it (``--kv-sidecar``, and
``--kv-sidecar-advertise`` so decode sidecars find the prefill's on the shared loopback): split
requests then move their prompts' real KV bytes between the sidecars, layout translation
included. Without it the worker takes the modelled transfer time (cheaper, for load tests).

It also runs one real router (``python -m tandem.router``) for the service: its config is the
operator-written router ConfigMap with each pool's ``endpoints`` set to the workers' loopback
addresses, rewritten whenever the ConfigMap (e.g. the planner's split threshold) or the
workers change; the router reloads it by itself.

The agent polls the API every ``poll_seconds`` in a thread; every process runs in its own
process group and is stopped by signalling that group (``stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from e2e.harness.common import REPO_ROOT, free_port, log, stop_process_groups, wait_for
from e2e.harness.prometheus import Prometheus

LABEL_SERVICE = "inference.tandem.dev/service"
LABEL_POOL = "inference.tandem.dev/pool"
LABEL_ROLE = "inference.tandem.dev/role"
SIDECAR_CONTAINER = "kv-sidecar"  # tandem.builders.kv.SIDECAR_CONTAINER
ROUTER_CONFIG_KEY = "router.json"
# Flags of the pod's command line the agent sets itself. ``--kv-sidecar $(TANDEM_KV_SIDECAR_URL)``
# names the pod's KV-transfer sidecar container: the agent sets the flag to the sidecar it runs, or
# drops it (the worker then takes the modelled transfer time). Passed through unexpanded, every
# pull failed and each decode worker silently recomputed the long prompts itself.
_OWN_FLAGS = {"--port", "--host", "--time-scale", "--kv-sidecar"}


@dataclass
class Worker:
    pod: str
    pool: str
    role: str
    port: int
    proc: subprocess.Popen[bytes]
    healthy: bool = False  # answered /health once: only then is it a router endpoint and a target
    sidecar: subprocess.Popen[bytes] | None = None  # the pod's kv-sidecar, when the agent runs it
    sidecar_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sidecar_url(self) -> str | None:
        return f"http://127.0.0.1:{self.sidecar_port}" if self.sidecar_port else None

    @property
    def groups(self) -> list[int]:
        return [self.proc.pid] + ([self.sidecar.pid] if self.sidecar is not None else [])

    def wait(self, timeout: float) -> None:
        for proc in (self.proc, self.sidecar):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)


@dataclass
class AgentStats:
    started: int = 0
    stopped: int = 0
    router_configs: int = 0
    split_thresholds: list[int] = field(default_factory=list)


def worker_args(command: list[str]) -> list[str]:
    """The pod's ``tandem-sim-worker ...`` arguments without the program and the flags the agent sets."""
    args = command[1:] if command and not command[0].startswith("-") else list(command)
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _OWN_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in _OWN_FLAGS:
            continue
        out.append(arg)
    return out


def sidecar_env(container: dict[str, Any], pod_name: str, port: int) -> dict[str, str]:
    """The sidecar container's env as the kubelet would give it, on the agent's loopback."""
    field_values = {"metadata.name": pod_name, "status.podIP": "127.0.0.1"}
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif (path := ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")) in field_values:
            env[var["name"]] = field_values[path]
    env.update(TANDEM_KV_PORT=str(port), TANDEM_KV_HOST="127.0.0.1", TANDEM_KV_LOG_LEVEL="WARNING")
    return env


def router_config_with_endpoints(config: dict[str, Any], endpoints: dict[str, list[str]]) -> dict[str, Any]:
    """The operator's router config with static loopback endpoints per pool (no discovery)."""
    doc = json.loads(json.dumps(config))
    for pool in doc.get("pools", []):
        pool["endpoints"] = sorted(endpoints.get(pool["name"], []))
    return doc


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def _ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


class FleetAgent:
    def __init__(
        self,
        api: Any,
        namespace: str,
        service: str,
        prometheus: Prometheus,
        workdir: Path | str,
        *,
        time_scale: float = 1.0,
        poll_seconds: float = 0.5,
        kv_sidecars: bool = False,
        kv_verify: bool = False,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.service = service
        self.prometheus = prometheus
        self.workdir = Path(workdir)
        self.time_scale = time_scale
        self.poll_seconds = poll_seconds
        self.kv_sidecars = kv_sidecars
        self.kv_verify = kv_verify  # workers have their sidecar check every pulled byte
        self.workers: dict[str, Worker] = {}
        self.router_port = free_port()
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.router_config_path = self.workdir / "router.json"
        self.stats = AgentStats()
        self._pools: dict[str, str] = {}  # pool -> role, of pools that ever had a worker
        self._registered: dict[str, tuple[str, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None  # of the last pass (None when it succeeded)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def router_log(self) -> Path:
        return self.workdir / "router.log"

    # lifecycle
    def start(self) -> FleetAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"fleet-agent-{self.service}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            groups = [g for w in self.workers.values() for g in w.groups]
            if self.router_proc is not None:
                groups.append(self.router_proc.pid)
            stop_process_groups(groups)
            for w in self.workers.values():
                w.wait(timeout=5)
            if self.router_proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.router_proc.wait(timeout=5)
            self.workers.clear()
            for name in list(self._registered):
                self.prometheus.remove_targets(name)
            self._registered.clear()

    def __enter__(self) -> FleetAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_router(self, timeout: float = 60.0) -> None:
        """Waits until the router answers /health."""

        def healthy() -> bool:
            if self.router_proc is None:
                return False
            if self.router_proc.poll() is not None:
                raise RuntimeError(f"the router exited; see {self.router_log}")
            try:
                return httpx.get(f"{self.router_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=timeout, what=f"the fleet agent's router (last error: {self.last_error})")

    def wait_router_replicas(self, roles: dict[str, int], timeout: float = 60.0) -> None:
        """Waits until the router knows at least ``roles[role]`` replicas of each role (its
        config comes from the operator's ConfigMap, a step behind the workers being up)."""

        def known() -> bool:
            try:
                replicas = httpx.get(f"{self.router_url}/router/state", timeout=2).json()["replicas"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return False
            seen: dict[str, int] = {}
            for r in replicas:
                seen[r["role"]] = seen.get(r["role"], 0) + 1
            return all(seen.get(role, 0) >= n for role, n in roles.items())

        wait_for(known, timeout=timeout, what=f"the router to know replicas {roles}")

    def workers_by_pool(self) -> dict[str, int]:
        """Workers that answer /health, per pool."""
        with self._lock:
            out: dict[str, int] = {}
            for w in self.workers.values():
                if w.healthy:
                    out[w.pool] = out.get(w.pool, 0) + 1
            return out

    # the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
                self.last_error = None
            except Exception as exc:  # shown by the waits; the next pass retries
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.poll_seconds)

    def sync(self) -> None:
        """One pass: start/stop workers for the Ready pods, update targets and the router config."""
        # Worker pods carry the service and role labels but not managed-by (only the router's
        # template has it), so the service label scopes the selection.
        selector = f"{LABEL_ROLE},{LABEL_SERVICE}={self.service}"
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        pods = self.core.api_client.sanitize_for_serialization(listed)  # wire (camelCase) dicts
        ready = {}
        for pod in pods["items"]:
            if _ready(pod):
                ready[pod["metadata"]["name"]] = pod
        with self._lock:
            if self._stop.is_set():
                return
            for name in [n for n in self.workers if n not in ready]:
                self._stop_worker(name)
            for name, pod in ready.items():
                if name not in self.workers:
                    self._start_worker(pod)
            for w in self.workers.values():
                if not w.healthy:
                    w.healthy = _answers(f"http://{w.address}/health") and (
                        w.sidecar_url is None or _answers(f"{w.sidecar_url}/livez")
                    )
            self._sync_targets()
            self._sync_router()

    def _start_worker(self, pod: dict[str, Any]) -> None:
        labels = pod["metadata"]["labels"]
        containers = pod["spec"]["containers"]
        engine = next((c for c in containers if c.get("name") == "engine"), containers[0])
        command = engine.get("command") or []
        port = free_port()
        cmd = [sys.executable, "-m", "tandem.sim.worker", *worker_args(command)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--time-scale", str(self.time_scale)]
        cmd += ["--log-level", "WARNING"]
        name = pod["metadata"]["name"]
        sidecar_spec = next((c for c in containers if c.get("name") == SIDECAR_CONTAINER), None)
        sidecar: subprocess.Popen[bytes] | None = None
        sidecar_port: int | None = None
        if self.kv_sidecars and sidecar_spec is not None:
            sidecar_port = free_port()
            url = f"http://127.0.0.1:{sidecar_port}"
            sidecar = self._spawn(
                [sys.executable, "-m", "tandem.sidecar"],
                f"sidecar-{name}.log",
                sidecar_env(sidecar_spec, name, sidecar_port),
            )
            cmd += ["--kv-sidecar", url, "--kv-sidecar-advertise", url]
            if self.kv_verify:
                cmd.append("--kv-verify")
        proc = self._spawn(cmd, f"worker-{name}.log")
        pool, role = labels.get(LABEL_POOL, "?"), labels.get(LABEL_ROLE, "?")
        self.workers[name] = Worker(name, pool, role, port, proc, sidecar=sidecar, sidecar_port=sidecar_port)
        self._pools[pool] = role
        self.stats.started += 1

    def _spawn(
        self, cmd: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / log_name).open("ab") as logf:
            return subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def _stop_worker(self, name: str) -> None:
        w = self.workers.pop(name)
        stop_process_groups(w.groups, timeout=5)
        w.wait(timeout=5)
        self.stats.stopped += 1

    def sidecars(self, pool: str) -> list[str]:
        """The URLs of the sidecars of ``pool``'s healthy workers."""
        with self._lock:
            return [
                w.sidecar_url for w in self.workers.values() if w.pool == pool and w.healthy and w.sidecar_url
            ]

    def worker_urls(self, pool: str) -> list[str]:
        """The URLs of ``pool``'s healthy workers."""
        with self._lock:
            return [f"http://{w.address}" for w in self.workers.values() if w.pool == pool and w.healthy]

    def _target_name(self, pool: str) -> str:
        return f"{self.namespace}.{self.service}.{pool}"

    def _sync_targets(self) -> None:
        for pool, role in self._pools.items():
            addresses = tuple(
                sorted(w.address for w in self.workers.values() if w.pool == pool and w.healthy)
            )
            name = self._target_name(pool)
            if self._registered.get(name) == addresses:
                continue
            if addresses:
                labels = {"namespace": self.namespace, "service": self.service, "pool": pool, "role": role}
                self.prometheus.add_targets(name, list(addresses), labels)
            else:
                self.prometheus.remove_targets(name)
            self._registered[name] = addresses

    def _sync_router(self) -> None:
        cm = self.core.read_namespaced_config_map(f"{self.service}-router", self.namespace)
        text = (cm.data or {}).get(ROUTER_CONFIG_KEY)
        if not text:
            return
        endpoints: dict[str, list[str]] = {}
        for w in self.workers.values():
            if w.healthy:
                endpoints.setdefault(w.pool, []).append(w.address)
        doc = router_config_with_endpoints(json.loads(text), endpoints)
        rendered = json.dumps(doc, indent=2, sort_keys=True)
        current = self.router_config_path.read_text() if self.router_config_path.exists() else None
        if rendered != current:
            tmp = self.router_config_path.with_suffix(".tmp")
            tmp.write_text(rendered)
            tmp.replace(self.router_config_path)
            self.stats.router_configs += 1
            threshold = int(doc.get("splitThresholdTokens", 0))
            if not self.stats.split_thresholds or self.stats.split_thresholds[-1] != threshold:
                self.stats.split_thresholds.append(threshold)
        if self.router_proc is None:
            self._start_router()

    def _start_router(self) -> None:
        cmd = [sys.executable, "-m", "tandem.router", "--config", str(self.router_config_path)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.router_port), "--reload-seconds", "0.5"]
        cmd += ["--log-level", "WARNING"]
        self.router_proc = self._spawn(cmd, self.router_log.name)
        # scraped like the workers, without pool and role: the planner reads its client-side TTFT
        name, address = f"{self.namespace}.{self.service}.router", f"127.0.0.1:{self.router_port}"
        self.prometheus.add_targets(name, [address], {"namespace": self.namespace, "service": self.service})
        self._registered[name] = (address,)  # removed at stop() with the workers' targets
        log(f"Started the router for {self.namespace}/{self.service} on {self.router_url}")


def wait_workers(agent: FleetAgent, expected: dict[str, int], timeout: float = 60.0) -> None:
    """Waits until the agent runs exactly ``expected`` workers per pool."""

    try:
        wait_for(lambda: agent.workers_by_pool() == expected, timeout=timeout, what=f"workers {expected}")
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc}; running {agent.workers_by_pool()}, last error: {agent.last_error}"
        ) from exc
