"""Helpers behind the e2e fixtures (see e2e/conftest.py): failure diagnostics and test-private
fake nodes. Kept out of conftest.py so tests can import the types."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from e2e.harness import cluster as cluster_mod
from e2e.harness import fleet as fleet_mod
from e2e.harness.common import STATE_ROOT

DIAGNOSTICS_DIR = STATE_ROOT / "e2e" / "diagnostics"


class Diagnostics:
    """What to dump when a test fails: namespaces (events, pods) and log files."""

    def __init__(self, cluster: cluster_mod.Cluster, test_id: str) -> None:
        self._cluster = cluster
        self._test_id = test_id
        self.logs: list[Path] = []
        self.namespaces: list[str] = []
        self._dumped = False

    def add_log(self, path: Path | str) -> None:
        """Registers a log file (e.g. the operator's) to print if the test fails."""
        self.logs.append(Path(path))

    def add_namespace(self, name: str) -> None:
        self.namespaces.append(name)

    def _kubectl_text(self, *args: str) -> str:
        proc = self._cluster.kubectl(*args, check=False)
        return proc.stdout + proc.stderr

    def render(self, *, tail_lines: int = 200) -> str:
        parts = [f"===== diagnostics for {self._test_id}"]
        for ns in self.namespaces:
            parts.append(f"----- events in namespace {ns}")
            parts.append(self._kubectl_text("get", "events", "-n", ns, "--sort-by=.lastTimestamp"))
            parts.append(f"----- pods in namespace {ns}")
            parts.append(self._kubectl_text("get", "pods", "-n", ns, "-o", "wide"))
        for path in self.logs:
            parts.append(f"----- last {tail_lines} lines of {path}")
            try:
                parts.append("\n".join(path.read_text(errors="replace").splitlines()[-tail_lines:]))
            except OSError as exc:
                parts.append(f"(unreadable: {exc})")
        return "\n".join(parts)

    def dump(self) -> None:
        """Prints the diagnostics (pytest shows them with the failure) and saves them to a file; once."""
        if self._dumped:
            return
        self._dumped = True
        text = self.render()
        print(text)
        DIAGNOSTICS_DIR.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self._test_id)[-150:]
        (DIAGNOSTICS_DIR / f"{safe}.txt").write_text(text)


class FakeNodes:
    """Test-private fake nodes: a fleet named after the test's namespace, deleted after the test.

    Use it when a test needs to know exactly which devices are free (the shared demo fleet may be
    in use by other tests or by a developer's demo on the same cluster).
    """

    def __init__(self, cluster: cluster_mod.Cluster, namespace: str) -> None:
        self._cluster = cluster
        self.fleet_name = namespace
        self._groups: list[fleet_mod.NodeGroup] = []

    def add(self, like: fleet_mod.NodeGroup, count: int) -> fleet_mod.Fleet:
        """Registers ``count`` nodes shaped like ``like`` (labels, taints, capacity) and waits until
        they are schedulable. Select them with ``{FLEET_LABEL: fake_nodes.fleet_name}``."""
        group = dataclasses.replace(like, name_prefix=f"{self.fleet_name}-{like.name_prefix}", count=count)
        self._groups.append(group)
        fleet = fleet_mod.Fleet(name=self.fleet_name, groups=tuple(self._groups))
        fleet_mod.register_and_wait(self._cluster.api(), fleet)
        return fleet

    def remove_all(self) -> None:
        if self._groups:
            fleet_mod.unregister(self._cluster.api(), fleet_mod.Fleet(self.fleet_name, tuple(self._groups)))
