"""Fixtures for the e2e suite (run with `pytest e2e`).

``cluster`` (session): the local kwok cluster, started once (or reused if `make cluster-up` already
runs one; a cluster the session started is stopped at its end unless TANDEM_E2E_KEEP_CLUSTER=1).
With TANDEM_E2E_EXTERNAL=1 the suite instead uses the cluster of $TANDEM_E2E_KUBECONFIG or
$KUBECONFIG (e.g. kind, see e2e/kind/README.md), whose fleet must already be registered.

``namespace`` (function): a fresh namespace per test, deleted afterwards; on failure its events,
pods and every log registered with ``diagnostics.add_log`` are printed and saved under
``.tandem/e2e/diagnostics/``.

``fake_nodes`` (function): test-private fake nodes shaped like a fleet group, for tests that must
know exactly which devices are free; removed after the test.

``prometheus`` (session): a real Prometheus with file_sd targets (``add_targets``/``remove_targets``)
and ``query``.

Also: ``fleet`` (the demo fleet as loaded from e2e/fleets/demo.yaml) and ``kube_bin_dir``.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import cluster as cluster_mod
from e2e.harness import fleet as fleet_mod
from e2e.harness.common import bin_dir, wait_for
from e2e.harness.prometheus import Prometheus, prometheus_binary
from e2e.harness.testing import Diagnostics, FakeNodes

E2E_NAMESPACE_LABEL = "inference.tandem.dev/e2e"

phase_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the item, so fixtures can tell whether their test failed."""
    rep: pytest.TestReport = yield
    item.stash.setdefault(phase_report_key, {})[rep.when] = rep
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(phase_report_key, {})
    return any(r.failed for r in reports.values())


def _external() -> bool:
    return os.environ.get("TANDEM_E2E_EXTERNAL") == "1"


def _external_cluster() -> cluster_mod.Cluster:
    kubeconfig = os.environ.get("TANDEM_E2E_KUBECONFIG") or os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise pytest.UsageError("TANDEM_E2E_EXTERNAL=1 needs TANDEM_E2E_KUBECONFIG or KUBECONFIG")
    kubeconfig = kubeconfig.split(os.pathsep)[0]
    bins = os.environ.get("TANDEM_BIN_DIR")
    kubectl = str(Path(bins) / "kubectl") if bins else shutil.which("kubectl")
    if not kubectl:
        raise pytest.UsageError("no kubectl: put one on PATH or set TANDEM_BIN_DIR")
    return cluster_mod.Cluster(kubeconfig, kubectl, external=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[cluster_mod.Cluster]:
    """The cluster under test; KUBECONFIG points at it for the whole session."""
    started = False
    if _external():
        handle = _external_cluster()
        if not handle.ready():
            pytest.fail(f"the external cluster of {handle.kubeconfig} is not ready")
    else:
        running = cluster_mod.running()
        if running is None:
            handle, started = cluster_mod.up(), True
        else:
            handle = running
            fleet_mod.register_and_wait(handle.api(), fleet_mod.load_fleet(fleet_mod.DEFAULT_FLEET))
    old_kubeconfig = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(handle.kubeconfig)
    try:
        yield handle
    finally:
        if old_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old_kubeconfig
        handle.close()
        if started and os.environ.get("TANDEM_E2E_KEEP_CLUSTER") != "1":
            cluster_mod.down()


@pytest.fixture(scope="session")
def fleet() -> fleet_mod.Fleet:
    """The fleet registered on the cluster (e2e/fleets/demo.yaml)."""
    return fleet_mod.load_fleet(fleet_mod.DEFAULT_FLEET)


@pytest.fixture(scope="session")
def kube_bin_dir() -> Path:
    """The directory of the built tool binaries (kubectl, helm, ...)."""
    return bin_dir()


@pytest.fixture
def diagnostics(request: pytest.FixtureRequest, cluster: cluster_mod.Cluster) -> Iterator[Diagnostics]:
    diag = Diagnostics(cluster, request.node.nodeid)
    yield diag
    if _test_failed(request):
        diag.dump()


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")
    stem = stem.removeprefix("test-")[:40].strip("-")
    return f"e2e-{stem}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, cluster: cluster_mod.Cluster, diagnostics: Diagnostics
) -> Iterator[str]:
    """A unique namespace for this test; deleted afterwards, after waiting for its pods to go.

    Waiting for the pods (not the whole namespace) frees their devices on the fake nodes before
    the next test, at a fraction of the cost of waiting for namespace finalization.
    """
    from kubernetes import client

    core = client.CoreV1Api(cluster.api())
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name, "labels": {E2E_NAMESPACE_LABEL: "true"}}})
    diagnostics.add_namespace(name)
    # Pods are rejected until the service-account controller has created `default`.
    wait_for(
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items),
        timeout=30,
        what=f"service account default in {name}",
    )
    yield name
    if _test_failed(request):
        diagnostics.dump()
    core.delete_namespace(name, propagation_policy="Background")
    # A terminating namespace admits no new pods, so controllers cannot replace these; deleting
    # them here rather than waiting for the namespace controller saves about 5 s per test.
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    wait_for(
        lambda: not core.list_namespaced_pod(name).items,
        timeout=60,
        what=f"pods of namespace {name} deleted",
    )


@pytest.fixture
def fake_nodes(cluster: cluster_mod.Cluster, namespace: str) -> Iterator[FakeNodes]:
    nodes = FakeNodes(cluster, namespace)
    yield nodes
    nodes.remove_all()


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus on a loopback port for the session (file_sd, 1 s scrape interval)."""
    try:
        prometheus_binary()
    except Exception as exc:
        if _external():
            pytest.skip(str(exc))
        raise
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    """Everything under e2e/ is an e2e test, marked or not (so `-m "not e2e"` deselects it)."""
    for item in items:
        if "e2e" not in item.keywords:
            item.add_marker(pytest.mark.e2e)
