"""The chart's PodMonitor in a real Prometheus against real pods: the operator reconciles the
sample InferenceService on the local cluster, and a Prometheus running the scrape config
prometheus-operator would generate from the chart's PodMonitor (e2e.harness.podmonitor) must
give every worker and the router the labels the planner reads.

Debian's Prometheus has no Kubernetes discovery, so the test lists the namespace's pods from
the apiserver and hands them to Prometheus as file_sd targets with kubernetes_sd's meta labels;
selection and relabelling are Prometheus' own. KWOK's pods run no containers, so the scrapes
themselves fail: the targets' labels are what Prometheus would attach to every series."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness import podmonitor
from e2e.harness.chart import find, render
from e2e.harness.common import wait_for
from e2e.harness.operator import OperatorProcess, install_crds
from e2e.harness.prometheus import Prometheus

pytestmark = pytest.mark.e2e

SAMPLES = Path(__file__).parent / "samples"


@pytest.fixture
def operator(cluster: Any, namespace: str, diagnostics: Any) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    op = OperatorProcess.for_namespace(cluster, namespace)
    diagnostics.add_log(op.log_path)
    with op:
        yield op


@dataclass
class Discovering:
    server: Prometheus
    pods_dir: Path  # file_sd directory of the PodMonitor's job


@pytest.fixture
def discovering(cluster: Any, namespace: str, tmp_path: Path, diagnostics: Any) -> Iterator[Discovering]:
    """A Prometheus running the chart's PodMonitor for ``namespace``."""
    (pm,) = find(
        render(set_values=["metrics.podMonitor.enabled=true", f"watchNamespaces={{{namespace}}}"]),
        "PodMonitor",
    )
    sd_dir = tmp_path / "pods"
    sd_dir.mkdir()
    configs = [
        podmonitor.with_file_sd(c, str(sd_dir / "*.json"))
        for c in podmonitor.scrape_configs(pm, cluster.kubeconfig)
    ]
    server = Prometheus(tmp_path / "prometheus", extra_scrape_configs=configs)
    diagnostics.add_log(server.log_path)
    server.start()
    try:
        yield Discovering(server, sd_dir)
    finally:
        server.stop()


def tandem_targets(cluster: Any, namespace: str, prom: Discovering) -> dict[str, dict[str, str]]:
    """Pod name -> target labels, for the PodMonitor's job, after handing Prometheus the
    namespace's pods as they are now."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    path = prom.pods_dir / "pods.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(podmonitor.pod_target_groups(pods)))
    tmp.replace(path)
    targets = [
        t["labels"] for t in prom.server.active_targets() if t.get("scrapePool", "").startswith("podMonitor/")
    ]
    by_pod = {t["pod"]: t for t in targets}
    assert len(by_pod) == len(targets), f"a pod scraped more than once: {targets}"
    return by_pod


def test_pod_monitor_gives_every_worker_and_the_router_the_planners_labels(
    cluster: Any, namespace: str, operator: OperatorProcess, discovering: Discovering
) -> None:
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"] = {"name": "llama"}
    for pool in doc["spec"]["pools"]:  # names unlike the roles, so a mix-up of the two shows
        pool["name"] = {"prefill": "long", "decode": "gen", "mixed": "short"}[pool["role"]]
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    want = {p["name"]: (p["role"], p["replicas"]["min"]) for p in doc["spec"]["pools"]}
    expected = sum(n for _, n in want.values()) + 1  # every worker replica and the router

    def pods_found() -> dict[str, dict[str, str]] | None:
        found = tandem_targets(cluster, namespace, discovering)
        return found if len(found) == expected else None

    found = wait_for(pods_found, timeout=90, what=f"{expected} pods discovered through the PodMonitor")
    routers = [t for t in found.values() if "pool" not in t]
    workers = [t for t in found.values() if "pool" in t]
    assert len(routers) == 1 and routers[0]["pod"].startswith("llama-router-")
    assert routers[0]["namespace"] == namespace and routers[0]["service"] == "llama"
    assert "role" not in routers[0]
    by_pool: dict[str, int] = {}
    for t in workers:
        assert t["namespace"] == namespace and t["service"] == "llama", t
        role, _ = want[t["pool"]]
        assert t["role"] == role and t["accelerator_pool"], t
        assert t["pod"].startswith(f"llama-{t['pool']}-"), t
        by_pool[t["pool"]] = by_pool.get(t["pool"], 0) + 1
    assert by_pool == {name: n for name, (_, n) in want.items()}
