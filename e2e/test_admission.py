"""Invalid objects are rejected by the real apiserver at admission, with a readable message.

The rules are the CRD schema and CEL rules generated from Tandem's models; nothing here runs the
operator: this is what a user sees from `kubectl apply`.
"""

from __future__ import annotations

import copy
import subprocess
from typing import Any

import pytest
import yaml

from e2e.harness.operator import install_crds

VALID_SERVICE: dict[str, Any] = {
    "apiVersion": "inference.tandem.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "svc"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B", "preset": "llama-3.1-8b"},
        "pools": [
            {"name": "prefill", "role": "prefill", "acceleratorPool": "b200", "tensorParallelSize": 2},
            {
                "name": "decode",
                "role": "decode",
                "acceleratorPool": "gaudi3",
                "replicas": {"min": 1, "max": 3},
            },
        ],
    },
}
VALID_POOL: dict[str, Any] = {
    "apiVersion": "inference.tandem.dev/v1alpha1",
    "kind": "AcceleratorPool",
    "metadata": {"name": "admission-test"},
    "spec": {"vendor": "nvidia", "model": "H100-SXM", "costPerDeviceHour": "3.10"},
}


def edited(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``value`` at a dotted path (list indexes as numbers)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "duplicate pool names",
        edited(VALID_SERVICE, "spec.pools.1.name", "prefill"),
        "pool names must be unique",
    ),
    (
        "min above max",
        edited(VALID_SERVICE, "spec.pools.1.replicas", {"min": 4, "max": 2}),
        "replicas.min must not exceed replicas.max",
    ),
    (
        "min above the max left unset (the schema defaults nothing inside the pools list)",
        edited(VALID_SERVICE, "spec.pools.1.replicas", {"min": 3}),
        "replicas.min must not exceed replicas.max",
    ),
    (
        "prefill without decode",
        edited(VALID_SERVICE, "spec.pools.1.role", "mixed"),
        "a prefill pool needs a decode pool to hand its KV caches to",
    ),
    (
        "nothing generates tokens",
        edited(VALID_SERVICE, "spec.pools", [VALID_SERVICE["spec"]["pools"][0]]),
        "at least one pool must have role decode or mixed",
    ),
    (
        "tensor parallel not a power of two",
        edited(VALID_SERVICE, "spec.pools.0.tensorParallelSize", 3),
        "tensorParallelSize must be a power of two",
    ),
    (
        "maxUnavailable 0 would block node drains",
        edited(VALID_SERVICE, "spec.pools.0.maxUnavailable", 0),
        "maxUnavailable must be a number of at least 1 or a percentage",
    ),
    (
        "maxUnavailable percentage above 100",
        edited(VALID_SERVICE, "spec.pools.0.maxUnavailable", "150%"),
        "maxUnavailable must be a number of at least 1 or a percentage",
    ),
    (
        "pool name not DNS-safe",
        edited(VALID_SERVICE, "spec.pools.0.name", "Prefill_Pool"),
        "spec.pools[0].name in body should match",
    ),
    (
        "preset and architecture both",
        edited(
            VALID_SERVICE,
            "spec.model.architecture",
            {"parametersBillions": 8, "layers": 32, "hiddenSize": 4096, "kvHeads": 8, "headDim": 128},
        ),
        "model needs exactly one of preset",
    ),
    (
        "unknown preset",
        edited(VALID_SERVICE, "spec.model.preset", "gpt-5"),
        "model.preset must be one of",
    ),
    (
        "unknown role",
        edited(VALID_SERVICE, "spec.pools.0.role", "encode"),
        'Unsupported value: "encode"',
    ),
    (
        "name too long for child names",
        edited(VALID_SERVICE, "metadata.name", "a" * 43),
        "at most 42 characters",
    ),
    (
        "attainment above one",
        edited(VALID_SERVICE, "spec.slo", {"attainment": 1.5}),
        "spec.slo.attainment in body should be less than or equal to 1",
    ),
    (
        "no pools",
        edited(VALID_SERVICE, "spec.pools", []),
        "spec.pools: Invalid value: 0: spec.pools in body should have at least 1 items",
    ),
    (
        "unknown field",
        edited(VALID_SERVICE, "spec.replicas", 3),
        'unknown field "spec.replicas"',
    ),
    (
        "disaggregation always without prefill",
        edited(
            edited(VALID_SERVICE, "spec.pools", [VALID_SERVICE["spec"]["pools"][1]]),
            "spec.routing",
            {"disaggregation": "always"},
        ),
        "routing.disaggregation 'always' needs a prefill pool",
    ),
    (
        "accelerator not in the catalog and no profile",
        edited(VALID_POOL, "spec.model", "TPU-v9"),
        "model must be one of Tandem's catalog",
    ),
    (
        "rdma fabric without its resource",
        edited(VALID_POOL, "spec.fabric", {"type": "rdma"}),
        "fabric type rdma needs fabric.rdmaResource",
    ),
    (
        "price not a decimal",
        edited(VALID_POOL, "spec.costPerDeviceHour", "three dollars"),
        "spec.costPerDeviceHour in body should match",
    ),
    (
        "toleration key not a label key",
        edited(VALID_POOL, "spec.tolerations", [{"key": "gpu vendor!", "operator": "Exists"}]),
        "a toleration key must be a label key",
    ),
    (
        "toleration without a key and operator Equal",
        edited(VALID_POOL, "spec.tolerations", [{"operator": "Equal", "value": "x"}]),
        "a toleration without a key must use operator Exists",
    ),
    (
        "toleration Exists with a value",
        edited(VALID_POOL, "spec.tolerations", [{"key": "a.b/c", "operator": "Exists", "value": "x"}]),
        "a toleration with operator Exists must not have a value",
    ),
    (
        "tolerationSeconds without NoExecute",
        edited(
            VALID_POOL, "spec.tolerations", [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]
        ),
        "tolerationSeconds is only allowed with effect NoExecute",
    ),
    (
        "vendor other without a resource name",
        edited(
            edited(VALID_POOL, "spec.vendor", "other"),
            "spec.profile",
            {"bf16Tflops": 100, "memoryGiB": 32, "memoryBandwidthGBs": 900},
        ),
        "vendor 'other' needs an explicit resourceName",
    ),
]


@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    install_crds(cluster)


def create(cluster: Any, doc: dict[str, Any], namespace: str) -> subprocess.CompletedProcess[str]:
    ns = ["-n", namespace] if doc["kind"] == "InferenceService" else []
    return cluster.kubectl(  # type: ignore[no-any-return]
        "create",
        "--validate=strict",
        "--dry-run=server",
        *ns,
        "-f",
        "-",
        input=yaml.safe_dump(doc),
        check=False,
    )


def test_valid_objects_are_accepted(cluster: Any, crds: None, namespace: str) -> None:
    percent = edited(edited(VALID_SERVICE, "metadata.name", "percent"), "spec.pools.0.maxUnavailable", "25%")
    for doc in (VALID_SERVICE, VALID_POOL, percent):
        proc = create(cluster, doc, namespace)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("case", "doc", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected_with_a_message(
    cluster: Any, crds: None, namespace: str, case: str, doc: dict[str, Any], message: str
) -> None:
    proc = create(cluster, doc, namespace)
    assert proc.returncode != 0, f"{case}: accepted"
    assert message in proc.stderr, proc.stderr


def test_defaults_are_visible_after_admission(cluster: Any, crds: None, namespace: str) -> None:
    proc = cluster.kubectl(
        "create", "-n", namespace, "-f", "-", "-o", "yaml", input=yaml.safe_dump(VALID_SERVICE)
    )
    spec = yaml.safe_load(proc.stdout)["spec"]
    assert spec["engine"] == "vllm"
    assert (
        spec["slo"] == {"ttftSeconds": 2.0, "itlSeconds": 0.1, "attainment": 0.9}
        or spec["slo"]["attainment"] == 0.9
    )
    assert spec["kvTransfer"] == {"connector": "nixl", "fabric": "auto"}
    # nothing is defaulted inside the pools list, so GitOps re-applies stay clean: the models'
    # defaults (replicas 1..1, tensorParallelSize 1, maxUnavailable 1) apply in the operator
    assert spec["pools"][0] == VALID_SERVICE["spec"]["pools"][0]  # replicas, maxUnavailable unset
    assert spec["pools"][1] == VALID_SERVICE["spec"]["pools"][1]  # tensorParallelSize, maxUnavailable unset
    assert spec["autoscaling"]["mode"] == "off"
