"""Smoke tests of the e2e environment itself: real apiserver, real kube-scheduler against the fake
GPU fleet (kwok), and a real Prometheus scraping a file_sd target."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from e2e.harness.cluster import Cluster
from e2e.harness.common import expected_k8s_version, free_port, wait_for
from e2e.harness.fleet import FLEET_LABEL, Fleet
from e2e.harness.prometheus import Prometheus
from e2e.harness.testing import FakeNodes

pytestmark = pytest.mark.e2e

VENDOR_LABEL = "inference.tandem.dev/accelerator-vendor"
MODEL_LABEL = "inference.tandem.dev/accelerator-model"


def gpu_deployment(
    name: str,
    *,
    replicas: int,
    resources: dict[str, str],
    node_selector: dict[str, str],
    tolerate: list[str],
) -> dict[str, Any]:
    """A Deployment whose pods ask for accelerator devices, like an inference worker would."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": node_selector,
                    "tolerations": [
                        {"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in tolerate
                    ],
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "worker",
                            "image": "registry.invalid/tandem/fake-worker:0",
                            "resources": {"requests": resources, "limits": resources},
                        }
                    ],
                },
            },
        },
    }


def _pods(api: Any, namespace: str, app: str) -> list[Any]:
    return list(client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"app={app}").items)


def _condition(pod: Any, kind: str) -> Any:
    return next((c for c in (pod.status.conditions or []) if c.type == kind), None)


def _is_ready(pod: Any) -> bool:
    cond = _condition(pod, "Ready")
    return pod.status.phase == "Running" and cond is not None and cond.status == "True"


def _unschedulable(pod: Any) -> Any:
    cond = _condition(pod, "PodScheduled")
    if cond is not None and cond.status == "False" and cond.reason == "Unschedulable":
        return cond
    return None


def test_server_version_matches_the_built_kubernetes(cluster: Cluster) -> None:
    info = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    server = info["serverVersion"]["gitVersion"]
    if cluster.external:
        assert server.startswith("v1."), server
    else:
        assert server == expected_k8s_version()
        assert info["clientVersion"]["gitVersion"] == expected_k8s_version()


def test_fleet_is_registered_with_devices_and_taints(cluster: Cluster, fleet: Fleet) -> None:
    selector = f"{FLEET_LABEL}={fleet.name},{MODEL_LABEL}"
    nodes = client.CoreV1Api(cluster.api()).list_node(label_selector=selector).items
    by_model: dict[str, list[Any]] = {}
    for node in nodes:
        by_model.setdefault(node.metadata.labels[MODEL_LABEL], []).append(node)
    assert {m: len(ns) for m, ns in by_model.items()} == {"H100-SXM": 4, "B200": 2, "MI300X": 4, "Gaudi3": 4}
    resource_of = {"H100-SXM": "nvidia.com/gpu", "B200": "nvidia.com/gpu", "MI300X": "amd.com/gpu"}
    resource_of["Gaudi3"] = "habana.ai/gaudi"
    for model, model_nodes in by_model.items():
        for node in model_nodes:
            assert node.status.allocatable[resource_of[model]] == "8"
            assert [(t.key, t.value, t.effect) for t in node.spec.taints or []] == [
                (resource_of[model], "present", "NoSchedule")
            ]
            has_rdma = "rdma/rdma_shared_device_a" in node.status.allocatable
            assert has_rdma == (model != "MI300X"), node.metadata.name
            assert _condition(node, "Ready").status == "True"
    gpu_groups = [g for g in fleet.groups if MODEL_LABEL in g.labels]
    assert sum(len(ns) for ns in by_model.values()) == sum(g.count for g in gpu_groups)


def test_gpu_deployment_is_scheduled_on_matching_nodes_and_ready(
    cluster: Cluster, namespace: str, fleet: Fleet
) -> None:
    api = cluster.api()
    body = gpu_deployment(
        "h100-worker",
        replicas=2,
        resources={"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"},
        node_selector={FLEET_LABEL: fleet.name, VENDOR_LABEL: "nvidia", MODEL_LABEL: "H100-SXM"},
        tolerate=["nvidia.com/gpu"],
    )
    client.AppsV1Api(api).create_namespaced_deployment(namespace, body)

    def all_ready() -> list[Any] | None:
        pods = _pods(api, namespace, "h100-worker")
        return pods if len(pods) == 2 and all(_is_ready(p) for p in pods) else None

    pods = wait_for(all_ready, timeout=60, what="2 h100-worker pods Ready")
    core = client.CoreV1Api(api)
    for pod in pods:
        labels = core.read_node(pod.spec.node_name).metadata.labels
        assert labels[MODEL_LABEL] == "H100-SXM"
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert pod.status.pod_ip, "kwok's pod-ready stage assigns a pod IP"
    wait_for(
        lambda: (client.AppsV1Api(api).read_namespaced_deployment(name="h100-worker", namespace=namespace)
                 .status.available_replicas == 2),
        timeout=30,
        what="deployment h100-worker available",
    )  # fmt: skip


def test_overcommitted_vendor_leaves_a_pod_pending_with_the_scheduler_reason(
    cluster: Cluster, namespace: str, fleet: Fleet, fake_nodes: FakeNodes
) -> None:
    """Whole-node Gaudi pods, one more than there are (test-private) Gaudi nodes: each node takes
    exactly one, the last stays Pending with the scheduler's reason."""
    api = cluster.api()
    gaudi = next(g for g in fleet.groups if g.labels.get(MODEL_LABEL) == "Gaudi3")
    private = fake_nodes.add(gaudi, count=2)
    body = gpu_deployment(
        "gaudi-worker",
        replicas=private.size + 1,
        resources={"habana.ai/gaudi": "8"},
        node_selector={FLEET_LABEL: private.name, VENDOR_LABEL: "intel"},
        tolerate=["habana.ai/gaudi"],
    )
    client.AppsV1Api(api).create_namespaced_deployment(namespace, body)

    def settled() -> tuple[list[Any], list[Any]] | None:
        pods = _pods(api, namespace, "gaudi-worker")
        ready = [p for p in pods if _is_ready(p)]
        pending = [p for p in pods if _unschedulable(p)]
        return (ready, pending) if len(ready) == private.size and len(pending) == 1 else None

    ready, pending = wait_for(
        settled, timeout=60, what=f"{private.size} Gaudi pods Ready and 1 Unschedulable"
    )
    assert {p.spec.node_name for p in ready} == set(private.node_names())
    assert pending[0].status.phase == "Pending" and pending[0].spec.node_name is None
    assert f"{private.size} Insufficient habana.ai/gaudi" in _unschedulable(pending[0]).message


@pytest.mark.parametrize(
    ("case", "resources", "node_selector", "tolerate", "reason"),
    [
        (
            "impossible-count",
            {"amd.com/gpu": "16"},
            {VENDOR_LABEL: "amd"},
            ["amd.com/gpu"],
            "Insufficient amd.com/gpu",
        ),
        ("untolerated-taint", {"nvidia.com/gpu": "1"}, {MODEL_LABEL: "B200"}, [], "untolerated taint"),
        (
            "no-rdma-fabric",
            {"amd.com/gpu": "8", "rdma/rdma_shared_device_a": "1"},
            {MODEL_LABEL: "MI300X"},
            ["amd.com/gpu"],
            "Insufficient rdma/rdma_shared_device_a",
        ),
    ],
)
def test_unsatisfiable_pod_stays_pending(
    cluster: Cluster,
    namespace: str,
    case: str,
    resources: dict[str, str],
    node_selector: dict[str, str],
    tolerate: list[str],
    reason: str,
) -> None:
    api = cluster.api()
    body = gpu_deployment(
        case, replicas=1, resources=resources, node_selector=node_selector, tolerate=tolerate
    )
    client.AppsV1Api(api).create_namespaced_deployment(namespace, body)

    def pending() -> Any:
        pods = _pods(api, namespace, case)
        return _unschedulable(pods[0]) if pods else None

    condition = wait_for(pending, timeout=60, what=f"pod of {case} Unschedulable")
    assert reason in condition.message


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    """A tiny prometheus_client exporter on a loopback port, serving tandem_e2e_smoke_value 42."""
    registry = CollectorRegistry()
    Gauge("tandem_e2e_smoke_value", "Constant for the e2e smoke test.", registry=registry).set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prometheus_scrapes_a_file_sd_target(prometheus: Prometheus, metrics_endpoint: str) -> None:
    job = "e2e-smoke"
    prometheus.add_targets(job, [metrics_endpoint], {"suite": "smoke"})
    try:
        prometheus.wait_for_value(f'up{{job="{job}"}}', 1, timeout=30)
        assert prometheus.query_value(f'tandem_e2e_smoke_value{{job="{job}",suite="smoke"}}') == 42
    finally:
        prometheus.remove_targets(job)
