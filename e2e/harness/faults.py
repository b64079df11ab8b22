"""Fault injection for the e2e suite: a second, private local cluster whose control plane can be
stopped and restarted under a running operator, with the apiserver's audit log turned on.

Restarting kube-apiserver and etcd would disturb every other test (and engineer) on the shared
cluster, so `SideCluster` starts its own instance with ``python -m e2e.harness.cluster`` in a
subprocess (``$TANDEM_CLUSTER_DIR`` puts its state elsewhere; the harness module reads it at
import). kwokctl v0.8.0 offers ``stop cluster`` / ``start cluster`` (every component, etcd and the
apiserver included; etcd's data dir survives), not per-component control, so that is the fault.

The audit policy records, at Metadata level, every request made by a ServiceAccount: what
e2e/test_security.py needs to list the verbs the operator really uses.

`side_cluster` gives one instance per pytest session (started on first use, stopped at the end of
the session), so every module that needs it shares its ~30 s start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2e.harness.cluster import CLUSTER_NAME, Cluster
from e2e.harness.common import REPO_ROOT, STATE_ROOT, HarnessError, bin_dir, log, wait_for

SIDE_DIR = STATE_ROOT / "cluster-faults"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


class SideCluster:
    """A private cluster under ``state_dir`` (its own etcd, apiserver, ... on loopback ports)."""

    def __init__(self, state_dir: Path = SIDE_DIR, fleet: Path | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.fleet = fleet or REPO_ROOT / "e2e" / "fleets" / "demo.yaml"
        self.policy = self.state_dir / "audit-policy.yaml"
        self.workdir = self.state_dir / "kwok"
        self.audit_log = self.workdir / "clusters" / CLUSTER_NAME / "logs" / "audit.log"
        self.cluster: Cluster | None = None
        self.restarts = 0

    def _harness(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ, TANDEM_CLUSTER_DIR=str(self.state_dir), TANDEM_CLUSTER_AUDIT_POLICY=str(self.policy)
        )
        return subprocess.run(
            [sys.executable, "-m", "e2e.harness.cluster", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _kwokctl(self, *args: str) -> None:
        env = dict(os.environ, KWOK_WORKDIR=str(self.workdir))
        proc = subprocess.run(
            [str(bin_dir() / "kwokctl"), *args, "--name", CLUSTER_NAME],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise HarnessError(f"kwokctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def up(self) -> Cluster:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.policy.write_text(AUDIT_POLICY)
        t0 = time.monotonic()
        proc = self._harness("up", "--fleet", str(self.fleet))
        if proc.returncode != 0:
            raise HarnessError(f"the side cluster did not start:\n{proc.stderr[-4000:]}")
        self.cluster = Cluster(self.state_dir / "kubeconfig", bin_dir() / "kubectl")
        log(f"Side cluster up in {time.monotonic() - t0:.1f} s ({self.state_dir})")
        return self.cluster

    def restart_control_plane(self, *, down_seconds: float = 3.0) -> None:
        """Stops every component (etcd and kube-apiserver included), waits, starts them again."""
        assert self.cluster is not None
        self._kwokctl("stop", "cluster")
        wait_for(lambda: not self.cluster.ready(), timeout=60, what="the side apiserver stopped")  # type: ignore[union-attr]
        time.sleep(down_seconds)  # the operator sees refused connections for a while
        self._kwokctl("start", "cluster", "--wait", "120s")
        wait_for(self.cluster.ready, timeout=120, what="the side apiserver back")
        self.restarts += 1

    def down(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        proc = self._harness("down", timeout=120)
        if proc.returncode != 0:
            log(f"side cluster down failed:\n{proc.stderr[-2000:]}")

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """The audit log's ResponseComplete events (of ``user`` only, if given)."""
        events = []
        for path in sorted(self.audit_log.parent.glob("audit*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("stage") != "ResponseComplete":
                    continue
                if user is None or event.get("user", {}).get("username") == user:
                    events.append(event)
        return events


_SIDE: SideCluster | None = None


def side_cluster(config: Any) -> SideCluster:
    """The session's side cluster, started on first call; ``config.add_cleanup`` stops it."""
    global _SIDE
    if _SIDE is None:
        side = SideCluster()
        try:
            side.up()
        except BaseException:
            side.down()
            raise
        config.add_cleanup(side.down)
        _SIDE = side
    return _SIDE
