"""The checked-in fleet files and kwok stages are well-formed (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from e2e.harness.cluster import STAGES_FILE
from e2e.harness.fleet import (
    FLEET_LABEL,
    FLEETS_DIR,
    KWOK_NODE_ANNOTATION,
    build_nodes,
    load_fleet,
    parse_fleet,
)

pytestmark = pytest.mark.e2e

VENDOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "intel": "habana.ai/gaudi"}


@pytest.mark.parametrize("path", sorted(FLEETS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_fleet_file_builds_valid_gpu_nodes(path: Path) -> None:
    fleet = load_fleet(path)
    nodes = build_nodes(fleet)
    names = [n["metadata"]["name"] for n in nodes]
    assert len(names) == len(set(names)) == fleet.size
    for node in nodes:
        labels = node["metadata"]["labels"]
        assert labels[FLEET_LABEL] == fleet.name
        assert node["metadata"]["annotations"][KWOK_NODE_ANNOTATION] == "fake"
        capacity = node["status"]["capacity"]
        assert node["status"]["allocatable"] == capacity
        assert {"cpu", "memory", "pods"} <= set(capacity)
        vendor = labels.get("inference.tandem.dev/accelerator-vendor")
        if vendor is None:
            continue
        resource = VENDOR_RESOURCE[vendor]
        assert capacity[resource] == "8"
        assert {"key": resource, "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        assert labels["inference.tandem.dev/accelerator-model"]


def test_demo_fleet_has_the_documented_shape() -> None:
    fleet = load_fleet(FLEETS_DIR / "demo.yaml")
    models: dict[str, int] = {}
    rdma: dict[str, bool] = {}
    for group in fleet.groups:
        model = group.labels.get("inference.tandem.dev/accelerator-model")
        if model:
            models[model] = models.get(model, 0) + group.count
            rdma[model] = "rdma/rdma_shared_device_a" in group.capacity
    assert models == {"H100-SXM": 4, "B200": 2, "MI300X": 4, "Gaudi3": 4}
    assert rdma == {"H100-SXM": True, "B200": True, "MI300X": False, "Gaudi3": True}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"groups": [{"namePrefix": "a", "count": 1}]}, "`name` is required"),
        ({"name": "x", "groups": []}, "`groups` must be a non-empty list"),
        ({"name": "x", "groups": [{"namePrefix": "a", "count": -1}]}, "non-negative integer"),
        (
            {"name": "x", "groups": [{"namePrefix": "a", "count": 1}, {"namePrefix": "a", "count": 1}]},
            "duplicate",
        ),
        (
            {
                "name": "x",
                "groups": [{"namePrefix": "a", "count": 1, "taints": [{"key": "k", "effect": "Nope"}]}],
            },
            "effect must be one of",
        ),
    ],
)
def test_invalid_fleet_is_rejected(doc: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_fleet(doc)


def test_defaults_merge_into_groups() -> None:
    fleet = parse_fleet(
        {
            "name": "x",
            "defaults": {"labels": {"a": "1", "b": "1"}, "capacity": {"cpu": "4"}, "taints": []},
            "groups": [{"namePrefix": "n", "count": 2, "labels": {"b": "2", "flag": True}}],
        }
    )
    (group,) = fleet.groups
    assert dict(group.labels) == {"a": "1", "b": "2", "flag": "true"}
    assert dict(group.capacity) == {"cpu": "4"}
    assert fleet.node_names() == ["n-0", "n-1"]


def test_stages_cover_the_node_and_pod_lifecycle() -> None:
    stages = [d for d in yaml.safe_load_all(STAGES_FILE.read_text()) if d]
    assert all(d["kind"] == "Stage" and d["apiVersion"] == "kwok.x-k8s.io/v1alpha1" for d in stages)
    assert {d["metadata"]["name"] for d in stages} == {
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-crash-loop",  # e2e: a pool that cannot become ready
        "pod-complete",
        "pod-delete",
    }
