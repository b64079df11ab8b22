"""The local test cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the kwok
controller on 127.0.0.1, with a fleet of fake GPU nodes.

The control plane is started by ``kwokctl create cluster --runtime binary`` with every binary path
pointed at the locally built tools (``tools/build.sh``), so nothing is downloaded. kwokctl runs each
component in its own session and records its pid under the work dir; ``down`` asks kwokctl to stop
them and then stops any survivor's process group from those pid files.

State lives under ``.tandem/cluster/`` (git-ignored; ``$TANDEM_CLUSTER_DIR`` overrides it):
``kubeconfig``, ``state.json``, the generated ``kwokctl.yaml`` and kwokctl's work dir ``kwok/``
(PKI, etcd data, component logs and pids).

Run as a script::

    python -m e2e.harness.cluster up [--fleet e2e/fleets/demo.yaml]   # idempotent: reuses a running cluster
    python -m e2e.harness.cluster down
    python -m e2e.harness.cluster env      # prints `export KUBECONFIG=...` (and PATH for the built kubectl)
    python -m e2e.harness.cluster status
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.harness import fleet as fleet_mod
from e2e.harness.common import (
    REPO_ROOT,
    STATE_ROOT,
    HarnessError,
    bin_dir,
    group_alive,
    log,
    stop_process_groups,
    wait_for,
)

CLUSTER_NAME = "tandem"
# TANDEM_CLUSTER_DIR lets a second cluster run beside the default one (e.g. for a scale run).
STATE_DIR = Path(os.environ.get("TANDEM_CLUSTER_DIR") or STATE_ROOT / "cluster").resolve()
KUBECONFIG_PATH = STATE_DIR / "kubeconfig"
STATE_FILE = STATE_DIR / "state.json"
KWOKCTL_CONFIG = STATE_DIR / "kwokctl.yaml"
KWOK_WORKDIR = STATE_DIR / "kwok"
LOGS_DIR = KWOK_WORKDIR / "clusters" / CLUSTER_NAME / "logs"
STAGES_FILE = REPO_ROOT / "e2e" / "kwok" / "stages.yaml"
SERVICE_CIDR = "10.96.0.0/16"

COMPONENT_BINARIES = {
    "kubeApiserverBinary": "kube-apiserver",
    "kubeControllerManagerBinary": "kube-controller-manager",
    "kubeSchedulerBinary": "kube-scheduler",
    "kubectlBinary": "kubectl",
    "etcdBinary": "etcd",
    "etcdctlBinary": "etcdctl",
    "kwokControllerBinary": "kwok",
}


@dataclass(frozen=True)
class ClusterState:
    name: str
    kubeconfig: str
    bin_dir: str
    workdir: str
    fleet: str
    started_at: float


class Cluster:
    """A handle on a running cluster, local or external, for the harness and the e2e fixtures."""

    def __init__(self, kubeconfig: Path | str, kubectl_path: Path | str, *, external: bool = False) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.kubectl_path = str(kubectl_path)
        self.external = external
        self._api: Any = None

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this cluster; raises CalledProcessError (with stderr) on failure."""
        proc = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def api(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (created once, then shared)."""
        if self._api is None:
            from kubernetes import config

            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def ready(self) -> bool:
        """True if the apiserver answers /readyz with ok."""
        proc = self.kubectl("get", "--raw", "/readyz", check=False, timeout=5)
        return proc.returncode == 0 and proc.stdout.strip() == "ok"

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def _kwokctl(bins: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KWOK_WORKDIR": str(KWOK_WORKDIR)}
    proc = subprocess.run(
        [str(bins / "kwokctl"), *args], env=env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise HarnessError(
            f"kwokctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def render_kwokctl_config(bins: Path) -> dict[str, Any]:
    """kwokctl configuration: binary runtime, loopback only, every binary local (no downloads)."""
    options: dict[str, Any] = {
        "runtime": "binary",
        "bindAddress": "127.0.0.1",
        "disableQPSLimits": True,
        # kwokctl's defaults are download URLs; each component must point at a local file.
        **{key: str(bins / name) for key, name in COMPONENT_BINARIES.items()},
    }
    # --- audit log (e2e/harness/faults.py): $TANDEM_CLUSTER_AUDIT_POLICY turns on the apiserver's
    # audit log (kwok/clusters/tandem/logs/audit.log), e.g. to list the calls the operator makes.
    audit_policy = os.environ.get("TANDEM_CLUSTER_AUDIT_POLICY")
    if audit_policy:
        options["kubeAuditPolicy"] = str(Path(audit_policy).resolve())
    # --- end audit log
    # The apiserver's default service range is a /24 (254 ClusterIPs): too small for scale runs
    # with hundreds of InferenceServices, each with a router Service.
    patches = [
        {
            "name": "kube-apiserver",
            "extraArgs": [{"key": "service-cluster-ip-range", "value": SERVICE_CIDR}],
        }
    ]
    return {
        "kind": "KwokctlConfiguration",
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "options": options,
        "componentsPatches": patches,
    }


def _read_state() -> ClusterState | None:
    try:
        return ClusterState(**json.loads(STATE_FILE.read_text()))
    except (FileNotFoundError, TypeError, ValueError):
        return None


def _component_pid_files() -> list[Path]:
    return sorted((KWOK_WORKDIR / "clusters" / CLUSTER_NAME / "pids").glob("*.pid"))


def component_logs() -> list[Path]:
    """The control-plane component log files (for diagnostics)."""
    return sorted(LOGS_DIR.glob("*.log"))


def handle(state: ClusterState | None = None) -> Cluster:
    """A Cluster for the local cluster (from its state file)."""
    state = state or _read_state()
    if state is None:
        raise HarnessError("no local cluster state; run `python -m e2e.harness.cluster up`")
    return Cluster(state.kubeconfig, Path(state.bin_dir) / "kubectl")


def running() -> Cluster | None:
    """The local cluster if its state exists and its apiserver is ready, else None."""
    state = _read_state()
    if state is None or not Path(state.kubeconfig).exists():
        return None
    cluster = handle(state)
    try:
        return cluster if cluster.ready() else None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialises up/down between processes (two test sessions may start at once)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def up(fleet_path: Path | str = fleet_mod.DEFAULT_FLEET, *, timeout: float = 180.0) -> Cluster:
    """Starts the cluster and registers the fleet; reuses a cluster that is already running."""
    with _locked():
        return _up(fleet_path, timeout=timeout)


def _up(fleet_path: Path | str, *, timeout: float) -> Cluster:
    t0 = time.monotonic()
    fleet = fleet_mod.load_fleet(fleet_path)
    cluster = running()
    if cluster is not None:
        log(f"Reusing the running cluster ({cluster.kubeconfig})")
    else:
        if _read_state() is not None or KWOK_WORKDIR.exists():
            log("Found a stale cluster; tearing it down first")
            _down()
        bins = bin_dir()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        KWOKCTL_CONFIG.write_text(yaml.safe_dump(render_kwokctl_config(bins), sort_keys=False))
        log(f"Starting the control plane with kwokctl (binaries: {bins}, logs: {LOGS_DIR})")
        _kwokctl(
            bins,
            "--config", str(KWOKCTL_CONFIG),
            "--config", str(STAGES_FILE),
            "create", "cluster",
            "--name", CLUSTER_NAME,
            "--kubeconfig", str(KUBECONFIG_PATH),
            "--wait", f"{int(timeout)}s",
        )  # fmt: skip
        state = ClusterState(
            name=CLUSTER_NAME,
            kubeconfig=str(KUBECONFIG_PATH),
            bin_dir=str(bins),
            workdir=str(KWOK_WORKDIR),
            fleet=str(Path(fleet_path).resolve()),
            started_at=time.time(),
        )
        STATE_FILE.write_text(json.dumps(asdict(state), indent=2) + "\n")
        cluster = handle(state)
        wait_for(cluster.ready, timeout=timeout, what="kube-apiserver /readyz")
        log(f"Control plane ready in {time.monotonic() - t0:.1f} s")
    fleet_mod.register_and_wait(cluster.api(), fleet)
    log(f"Cluster up in {time.monotonic() - t0:.1f} s; {env_lines(cluster)[0]}")
    return cluster


def down() -> None:
    """Stops every component and removes the cluster's state (the kubeconfig included)."""
    with _locked():  # the lock file stays: unlinking it would let two processes lock two inodes
        _down()


def _started_by_us(pid: int) -> bool:
    """True if ``pid`` runs a binary from our kwok work dir (guards against reused pids)."""
    try:
        return str(KWOK_WORKDIR) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _down() -> None:
    state = _read_state()
    kwokctl = Path(state.bin_dir) / "kwokctl" if state else None
    if kwokctl is not None and kwokctl.exists() and KWOK_WORKDIR.exists():
        proc = _kwokctl(kwokctl.parent, "delete", "cluster", "--name", CLUSTER_NAME, check=False)
        if proc.returncode != 0:
            log(f"kwokctl delete cluster failed; stopping the components by pid\n{proc.stderr}")
    # Safety net: kwokctl starts each component with setsid, so its pid is its process group id.
    survivors = []
    for pid_file in _component_pid_files():
        try:
            pgid = int(pid_file.read_text().strip())
        except ValueError:
            continue
        if group_alive(pgid) and _started_by_us(pgid):
            log(f"Stopping {pid_file.stem} (process group {pgid})")
            survivors.append(pgid)
    # kwokctl itself SIGKILLs; a short grace is plenty for a throwaway cluster (kube-apiserver's
    # graceful shutdown alone takes over 10 s).
    stop_process_groups(survivors, timeout=3.0)
    shutil.rmtree(KWOK_WORKDIR, ignore_errors=True)
    for path in (STATE_FILE, KUBECONFIG_PATH, KWOKCTL_CONFIG):
        path.unlink(missing_ok=True)
    log("Cluster down")


def env_lines(cluster: Cluster | None = None) -> list[str]:
    lines = [f"export KUBECONFIG={KUBECONFIG_PATH}"]
    if cluster is not None:
        lines.append(f'export PATH="{Path(cluster.kubectl_path).parent}:$PATH"')
    return lines


def status() -> int:
    state = _read_state()
    if state is None:
        print("cluster: not created")
        return 1
    cluster = handle(state)
    alive = []
    for pid_file in _component_pid_files():
        try:
            pid = int(pid_file.read_text().strip())
            up_ = group_alive(pid) and _started_by_us(pid)
        except ValueError:
            up_ = False
        alive.append(f"{pid_file.stem}={'running' if up_ else 'DEAD'}")
    print(f"cluster: {state.name}  kubeconfig: {state.kubeconfig}")
    print(f"components: {' '.join(alive) or 'none'}")
    if not cluster.ready():
        print("apiserver: NOT ready")
        return 1
    print(f"apiserver: ready, uptime {time.time() - state.started_at:.0f} s")
    print(cluster.kubectl("get", "nodes", "-L", "inference.tandem.dev/accelerator-model").stdout.rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.harness.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "env", "status"])
    parser.add_argument("--fleet", default=str(fleet_mod.DEFAULT_FLEET), help="fleet file for `up`")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(args.fleet)
        elif args.action == "down":
            down()
        elif args.action == "env":
            state = _read_state()
            print("\n".join(env_lines(handle(state) if state else None)))
        else:
            return status()
    except (HarnessError, TimeoutError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
