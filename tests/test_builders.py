"""Golden manifests and properties of the pure builders, per vendor, engine and role."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from helpers import check_golden, make_ctx
from tandem import names
from tandem.builders import ServiceContext, desired_objects
from tandem.builders.engine import engine_args
from tandem.builders.kv import pool_profile
from tandem.models import InferenceServiceSpec
from tandem.planner import base_replicas
from tandem.resolve import resolve


def spec_for(engine: str, vendor_pool: str, role: str) -> dict[str, Any]:
    pools = [{"name": role, "role": role, "acceleratorPool": vendor_pool, "tensorParallelSize": 2}]
    if role == "prefill":
        pools.append({"name": "decode", "role": "decode", "acceleratorPool": vendor_pool})
    return {
        "model": {"name": "meta-llama/Llama-3.1-8B", "preset": "llama-3.1-8b"},
        "engine": engine,
        "pools": pools,
    }


CASES = [
    (engine, pool, role)
    for engine in ("vllm", "sglang", "sim")
    for pool in ("h100", "mi300x", "gaudi3")
    for role in ("prefill", "mixed")
]


@pytest.mark.parametrize(("engine", "pool", "role"), CASES)
def test_golden_manifests(engine: str, pool: str, role: str, sample_pools: dict[str, dict]) -> None:
    ctx = make_ctx(spec_for(engine, pool, role), sample_pools)
    check_golden(f"{engine}-{pool}-{role}", desired_objects(ctx))


def test_sample_service_objects(sample_service: dict, sample_pools: dict[str, dict]) -> None:
    ctx = make_ctx(sample_service["spec"], sample_pools)
    objects = desired_objects(ctx)
    check_golden("sample-llama", objects)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert kinds == [
        ("Service", "llama-prefill"),
        ("PodDisruptionBudget", "llama-prefill"),
        ("Deployment", "llama-prefill"),
        ("Service", "llama-decode"),
        ("PodDisruptionBudget", "llama-decode"),
        ("Deployment", "llama-decode"),
        ("Service", "llama-mixed"),
        ("PodDisruptionBudget", "llama-mixed"),
        ("Deployment", "llama-mixed"),
        ("ServiceAccount", "llama-router"),
        ("Role", "llama-router"),
        ("RoleBinding", "llama-router"),
        ("ConfigMap", "llama-router"),
        ("Service", "llama-router"),
        ("Deployment", "llama-router"),
    ]


def deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def test_worker_lands_on_its_vendor(sample_service: dict, sample_pools: dict[str, dict]) -> None:
    objects = desired_objects(make_ctx(sample_service["spec"], sample_pools))
    decode = deployment(objects, "llama-decode")
    pod = decode["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Gaudi 3 decode: 8 habana.ai/gaudi devices (tensorParallelSize 8), the Gaudi taint tolerated,
    # required node affinity on the pool's selector.
    assert container["resources"]["limits"]["habana.ai/gaudi"] == "8"
    assert container["resources"]["requests"]["habana.ai/gaudi"] == "8"
    assert {"key": "habana.ai/gaudi", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    assert term["matchExpressions"] == [
        {"key": "inference.tandem.dev/accelerator-model", "operator": "In", "values": ["Gaudi3"]}
    ]
    labels = decode["spec"]["template"]["metadata"]["labels"]
    assert labels[names.LABEL_ROLE] == "decode"
    assert labels[names.LABEL_VENDOR] == "intel"
    assert labels[names.LABEL_LLMD_ROLE] == "decode"
    assert deployment(objects, "llama-mixed")["spec"]["template"]["metadata"]["labels"][
        names.LABEL_LLMD_ROLE
    ] == ("prefill-decode")
    assert decode["spec"]["replicas"] == 2  # min, before any planner
    owner = decode["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "InferenceService" and owner["controller"] is True


def test_vllm_kv_transfer_config_per_role_and_vendor(sample_pools: dict[str, dict]) -> None:
    spec = InferenceServiceSpec.model_validate(
        {
            "model": {"name": "m", "preset": "llama-3.1-8b"},
            "pools": [
                {"name": "p", "role": "prefill", "acceleratorPool": "h100", "tensorParallelSize": 4},
                {"name": "d", "role": "decode", "acceleratorPool": "gaudi3"},
                {"name": "x", "role": "mixed", "acceleratorPool": "mi300x"},
            ],
        }
    )
    res = resolve(spec, sample_pools)
    accels = res.accelerator_pools
    prefill = engine_args(spec, spec.pools[0], accels["p"], pool_profile(spec, spec.pools[0], accels))
    decode = engine_args(spec, spec.pools[1], accels["d"], pool_profile(spec, spec.pools[1], accels))
    mixed = engine_args(spec, spec.pools[2], accels["x"], pool_profile(spec, spec.pools[2], accels))
    assert prefill[:3] == ["vllm", "serve", "m"]
    assert prefill[prefill.index("--tensor-parallel-size") + 1] == "4"
    assert '"kv_connector":"NixlConnector"' in prefill[prefill.index("--kv-transfer-config") + 1]
    assert '"kv_buffer_device":"cuda"' in prefill[prefill.index("--kv-transfer-config") + 1]
    # Gaudi stages KV in host memory
    assert '"kv_buffer_device":"cpu"' in decode[decode.index("--kv-transfer-config") + 1]
    assert "--kv-transfer-config" not in mixed


def test_user_overrides_merge(sample_pools: dict[str, dict]) -> None:
    doc = spec_for("vllm", "h100", "mixed")
    doc["pools"][0].update(
        {
            "resources": {"requests": {"cpu": 16, "memory": "200Gi", "nvidia.com/gpu": 1}},
            "env": [{"name": "TANDEM_ROLE", "value": "custom"}, {"name": "HF_HOME", "value": "/cache"}],
            "args": ["--enable-prefix-caching"],
            "image": "example.com/my-vllm:1",
        }
    )
    ctx = make_ctx(doc, sample_pools)
    container = deployment(desired_objects(ctx), "llama-mixed")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "example.com/my-vllm:1"
    assert container["command"][-1] == "--enable-prefix-caching"
    # the device count follows tensorParallelSize, not a conflicting override
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "2"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TANDEM_ROLE"] == "custom" and env["HF_HOME"] == "/cache"
    assert [e["name"] for e in container["env"]].count("TANDEM_ROLE") == 1


def test_builders_are_deterministic(sample_service: dict, sample_pools: dict[str, dict]) -> None:
    a = desired_objects(make_ctx(sample_service["spec"], sample_pools))
    b = desired_objects(make_ctx(sample_service["spec"], sample_pools))
    assert a == b
    hashes = {o["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] for o in a}
    assert len(hashes) == len(a)


def test_external_mode_leaves_replicas_to_the_hpa(
    sample_service: dict, sample_pools: dict[str, dict]
) -> None:
    doc = dict(sample_service["spec"], autoscaling={"mode": "external"})
    spec = InferenceServiceSpec.model_validate(doc)
    live = {"decode": {"spec": {"replicas": 3}}}
    replicas = base_replicas(spec, live)
    assert replicas["decode"] is None  # already exists: the HPA owns it
    assert replicas["prefill"] == 1  # creation: start at min
    res = resolve(spec, sample_pools)
    ctx = ServiceContext("llama", "ns", "u", spec, res.accelerator_pools, replicas)
    assert "replicas" not in deployment(desired_objects(ctx), "llama-decode")["spec"]


def test_router_may_only_read_endpointslices(sample_service: dict, sample_pools: dict[str, dict]) -> None:
    objects = desired_objects(make_ctx(sample_service["spec"], sample_pools))
    role = next(o for o in objects if o["kind"] == "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-router", "namespace": "team-a"}]
    router = deployment(objects, "llama-router")["spec"]["template"]["spec"]
    assert router["serviceAccountName"] == "llama-router"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engines_serve_prometheus_metrics(engine: str, sample_pools: dict[str, dict]) -> None:
    """The planner and the router's load polling read every worker's /metrics: vLLM serves them
    on its API port by default, SGLang only with --enable-metrics."""
    ctx = make_ctx(spec_for(engine, "h100", "mixed"), sample_pools)
    deployment = next(
        o for o in desired_objects(ctx) if o["kind"] == "Deployment" and "mixed" in o["metadata"]["name"]
    )
    command = deployment["spec"]["template"]["spec"]["containers"][0].get("command", []) + deployment["spec"][
        "template"
    ]["spec"]["containers"][0].get("args", [])
    if engine == "sglang":
        assert "--enable-metrics" in command
    else:
        assert "--port" in command and "--disable-log-stats" not in command


@pytest.mark.parametrize("value", [1, 3, "25%", "100%"])
def test_each_pool_gets_a_disruption_budget(
    value: int | str, sample_service: dict, sample_pools: dict[str, dict]
) -> None:
    spec = copy.deepcopy(sample_service["spec"])
    spec["pools"][0]["maxUnavailable"] = value
    objects = desired_objects(make_ctx(spec, sample_pools))
    pdbs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodDisruptionBudget"}
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(pdbs) == {"llama-prefill", "llama-decode", "llama-mixed"}
    assert pdbs["llama-prefill"]["spec"]["maxUnavailable"] == value
    assert pdbs["llama-decode"]["spec"]["maxUnavailable"] == 1  # the default
    for name, pdb in pdbs.items():
        # it selects exactly the pool's pods
        assert pdb["spec"]["selector"] == deployments[name]["spec"]["selector"]


@pytest.mark.parametrize("value", [0, -1, "0%", "101%", "25", "x%"])
def test_a_budget_that_blocks_drains_is_refused(value: object) -> None:
    from pydantic import ValidationError

    from tandem.models.inference_service import PoolSpec

    with pytest.raises(ValidationError, match="maxUnavailable must be"):
        PoolSpec.model_validate(
            {"name": "p", "role": "decode", "acceleratorPool": "a", "maxUnavailable": value}
        )
