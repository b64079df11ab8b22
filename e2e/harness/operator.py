"""Runs the Tandem operator as a real process (`python -m tandem.cli operator`) for e2e tests,
the demo and the benchmarks, and installs what it needs first (CRDs, the peering object)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from e2e.harness.common import REPO_ROOT, STATE_ROOT, free_port, wait_for

CRDS_DIR = REPO_ROOT / "crds"
PEERING_NAME = "tandem"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")


def install_crds(cluster: Any) -> None:
    """Applies Tandem's and kopf's CRDs, waits until they are served, creates the peering object."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_DIR))
    for crd in (
        "inferenceservices.inference.tandem.dev",
        "acceleratorpools.inference.tandem.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    cluster.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata:\n  name: {PEERING_NAME}\n",
    )


class OperatorProcess:
    @classmethod
    def for_namespace(cls, cluster: Any, namespace: str, **kwargs: Any) -> OperatorProcess:
        """A standalone operator watching only ``namespace`` of ``cluster``, logging to
        .tandem/e2e/operator-<namespace>.log (a namespaced operator with peering would wait for a
        namespaced KopfPeering)."""
        return cls(
            cluster.kubeconfig,
            STATE_ROOT / "e2e" / f"operator-{namespace}.log",
            namespaces=[namespace],
            standalone=True,
            **kwargs,
        )

    def __init__(
        self,
        kubeconfig: Path | str,
        log_path: Path | str,
        *,
        namespaces: list[str] | None = None,
        resync_seconds: float = 5.0,
        standalone: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.kubeconfig = str(kubeconfig)
        self.log_path = Path(log_path)
        self.namespaces = namespaces or []
        self.resync_seconds = resync_seconds
        self.standalone = standalone
        self.extra_args = extra_args or []
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tandem.cli", "operator"]
        cmd += [a for ns in self.namespaces for a in ("-n", ns)] or ["--all-namespaces"]
        cmd += ["--resync-seconds", str(self.resync_seconds)]
        cmd += ["--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1"]
        cmd += ["--liveness", f"http://127.0.0.1:{self.health_port}/healthz"]
        cmd += ["--standalone"] if self.standalone else ["--peering", PEERING_NAME]
        return cmd + self.extra_args

    def start(self, *, wait: bool = True) -> OperatorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, PYTHONUNBUFFERED="1")
        log = self.log_path.open("wb") if self._starts == 0 else self.log_path.open("ab")
        self._starts += 1
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
        log.close()
        if wait:
            wait_for(self.healthy, timeout=60, what="the operator's health endpoint")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited; see {self.log_path}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        self.stop(signal.SIGKILL)

    def metrics(self) -> dict[str, float]:
        """Samples of the operator's /metrics as {'name{label=value,...}': value}."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def kube_writes(self) -> int:
        return int(
            sum(
                v
                for k, v in self.metrics().items()
                if k.startswith("tandem_kube_requests_total{") and any(f"verb={w}" in k for w in WRITE_VERBS)
            )
        )

    def reconciles(self) -> int:
        return int(sum(v for k, v in self.metrics().items() if k.startswith("tandem_reconciles_total{")))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_seconds(seconds: float) -> None:
    """A deliberate pause (e.g. to let several resync periods pass), not a synchronisation."""
    time.sleep(seconds)
