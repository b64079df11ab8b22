"""KV profiles per vendor pair, the compatibility check, sidecar injection (golden) and KVTransferReady."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import is_sentence
from tandem.builders.common import Images
from tandem.builders.kv import (
    MULTUS_ANNOTATION,
    SIDECAR_CONTAINER,
    blocked_pools,
    check_compatibility,
    inject_sidecar,
    kv_profile,
    pool_profile,
)
from tandem.kv_status import (
    SidecarReport,
    kv_transfer_condition,
    parse_transport,
    report_from_readyz,
    sidecar_ready,
)
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec, KvTransfer, ModelSpec

GOLDEN = Path(__file__).parent / "golden" / "kv"

POOLS: dict[str, dict[str, Any]] = {
    "h100": {
        "vendor": "nvidia",
        "model": "H100-SXM",
        "fabric": {
            "type": "rdma",
            "rdmaResource": {"name": "rdma/rdma_shared_device_a", "count": 1},
            "networks": ["kv-fabric/rdma-net"],
        },
    },
    "b200": {
        "vendor": "nvidia",
        "model": "B200",
        "fabric": {"type": "rdma", "rdmaResource": {"name": "rdma/hca"}, "networks": ["kv-fabric/rdma-net"]},
    },
    "gaudi3": {
        "vendor": "intel",
        "model": "Gaudi3",
        "fabric": {"type": "rdma", "rdmaResource": {"name": "rdma/rdma_shared_device_a"}},
    },
    "mi300x": {"vendor": "amd", "model": "MI300X", "fabric": {"type": "tcp"}},
    "mi300x-rdma": {
        "vendor": "amd",
        "model": "MI300X",
        "fabric": {
            "type": "rdma",
            "rdmaResource": {"name": "rdma/rdma_shared_device_a"},
            "allowTcpFallback": True,
        },
    },
    "efa-h100": {
        "vendor": "nvidia",
        "model": "H100-SXM",
        "fabric": {
            "type": "rdma",
            "rdmaResource": {"name": "vpc.amazonaws.com/efa"},
            "transport": "libfabric",
        },
    },
}
MODEL = ModelSpec.model_validate({"name": "meta-llama/Llama-3.1-8B-Instruct", "preset": "llama-3.1-8b"})
FP8_MODEL = {"name": "m", "architecture": {
    "parametersBillions": 8, "layers": 32, "hiddenSize": 4096, "kvHeads": 8, "headDim": 128, "dtype": "fp8",
}}  # fmt: skip


def accel(name: str) -> AcceleratorPoolSpec:
    return AcceleratorPoolSpec.model_validate(POOLS[name])


def service(
    prefill: str, decode: str, *, model: Any = None, tp: tuple[int, int] = (1, 1), **kv: Any
) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {
            "model": model or MODEL.to_wire(),
            "engine": kv.pop("engine", "vllm"),
            "pools": [
                {
                    "name": "prefill",
                    "role": "prefill",
                    "acceleratorPool": prefill,
                    "tensorParallelSize": tp[0],
                },
                {"name": "decode", "role": "decode", "acceleratorPool": decode, "tensorParallelSize": tp[1]},
            ],
            "kvTransfer": kv,
        }
    )


def accels(spec: InferenceServiceSpec) -> dict[str, AcceleratorPoolSpec]:
    return {p.name: accel(p.accelerator_pool) for p in spec.pools}


def worker_template() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "w"}, "annotations": {MULTUS_ANNOTATION: "default/mgmt"}},
        "spec": {
            "containers": [
                {"name": "engine", "image": "e", "env": [{"name": "UCX_TLS", "value": "user-choice"}]}
            ],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        },
    }


PAIRS = [("h100", "h100"), ("h100", "gaudi3"), ("mi300x", "h100")]


@pytest.mark.parametrize(("p", "d"), PAIRS, ids=[f"{p}-to-{d}" for p, d in PAIRS])
def test_golden_profile_and_injection(p: str, d: str) -> None:
    spec = service(p, d)
    assert check_compatibility(spec, accels(spec)) == []
    profile = kv_profile(
        accel(p),
        accel(d),
        spec.model,
        spec.kv_transfer,
        prefill_pool=spec.pools[0],
        decode_pool=spec.pools[1],
    )
    doc = {
        "profile": {
            "fabric": profile.fabric,
            "translate": profile.translate,
            "kvBytesPerToken": profile.shape.bytes_per_token(),
            "prefill": {"vllmKvTransferConfig": profile.vllm_kv_transfer_config("prefill")},
            "decode": {"vllmKvTransferConfig": profile.vllm_kv_transfer_config("decode")},
        },
        "prefillTemplate": inject_sidecar(worker_template(), profile, "prefill", Images()),
        "decodeTemplate": inject_sidecar(worker_template(), profile, "decode", Images()),
    }
    text = yaml.safe_dump(doc, sort_keys=True)
    path = GOLDEN / f"{p}-to-{d}.yaml"
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path.name} was missing and has been written; re-run")
    assert text == path.read_text(), f"{path.name} differs; run UPDATE_GOLDEN=1 pytest if intended"


def test_per_vendor_derivation() -> None:
    nv_nv = kv_profile(accel("h100"), accel("h100"), MODEL, KvTransfer())
    assert nv_nv.fabric == "rdma" and not nv_nv.translate
    assert nv_nv.prefill.kv_buffer_device == "cuda" and nv_nv.prefill.layout == "NHD"
    assert nv_nv.prefill.block_size == 16
    assert nv_nv.prefill.ucx_tls == "rc,tcp,cuda_copy,sm,self"
    assert nv_nv.vllm_kv_transfer_config("decode") == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_buffer_device": "cuda",
        "kv_connector_extra_config": {"backends": ["UCX"]},
    }
    nv_gaudi = kv_profile(accel("h100"), accel("gaudi3"), MODEL, KvTransfer())
    assert nv_gaudi.translate and nv_gaudi.fabric == "rdma"
    assert (nv_gaudi.decode.kv_buffer_device, nv_gaudi.decode.layout, nv_gaudi.decode.block_size) == (
        "cpu",
        "HND",
        128,
    )
    assert nv_gaudi.decode.ucx_tls == "rc,tcp,sm,self"  # host staging: no device transport
    amd_nv = kv_profile(accel("mi300x"), accel("h100"), MODEL, KvTransfer())
    assert amd_nv.fabric == "tcp"  # auto: the MI300X pool has no RDMA
    assert amd_nv.prefill.ucx_tls == "tcp,rocm_copy,sm,self"
    assert amd_nv.expected_transport("decode") == "tcp"
    forced_tcp = kv_profile(accel("h100"), accel("h100"), MODEL, KvTransfer(fabric="tcp"))
    assert forced_tcp.fabric == "tcp" and forced_tcp.prefill.rdma_resource is None
    lmcache = kv_profile(accel("h100"), accel("h100"), MODEL, KvTransfer(connector="lmcache"))
    assert lmcache.kv_role("prefill") == "kv_producer" and lmcache.kv_role("decode") == "kv_consumer"
    # explicit AcceleratorPool engine settings win over the vendor defaults
    custom = accel("h100").model_copy(
        update={"engine": accel("h100").engine.model_copy(update={"kv_cache_layout": "HND"})}
    )
    assert kv_profile(custom, accel("h100"), MODEL, KvTransfer()).translate


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (service("mi300x", "h100", model=FP8_MODEL), "fp8_e4m3fnuz on MI300X, fp8_e4m3fn on H100-SXM"),
        (service("mi300x", "h100", fabric="rdma"), "the prefill side has no RDMA fabric"),
        (service("efa-h100", "h100"), "different RDMA transports (libfabric and ucx)"),
        (service("h100", "h100", tp=(4, 2)), "needs decode TP >= prefill TP"),
        (service("h100", "gaudi3", engine="sglang"), "cannot translate NHD/16 blocks to HND/128"),
    ],
    ids=["fp8-encodings", "rdma-required", "transport-mismatch", "tp-ratio", "sglang-translation"],
)
def test_incompatible_pairs(spec: InferenceServiceSpec, needle: str) -> None:
    (problem,) = check_compatibility(spec, accels(spec))
    assert problem.reason == "Incompatible"
    assert (problem.prefill_pool, problem.decode_pool) == ("prefill", "decode")
    assert "prefill pool 'prefill'" in problem.message and "decode pool 'decode'" in problem.message
    assert needle in problem.message
    assert blocked_pools(spec, [problem]) == {"prefill", "decode"}


def test_no_shared_network_and_partial_blocking() -> None:
    pools = dict(POOLS)
    spec = InferenceServiceSpec.model_validate(
        {
            "model": MODEL.to_wire(),
            "pools": [
                {"name": "p", "role": "prefill", "acceleratorPool": "h100"},
                {"name": "d1", "role": "decode", "acceleratorPool": "b200"},
                {"name": "d2", "role": "decode", "acceleratorPool": "other-net"},
            ],
        }
    )
    pools["other-net"] = {**POOLS["gaudi3"], "fabric": {**POOLS["gaudi3"]["fabric"], "networks": ["x/y"]}}
    resolved = {p.name: AcceleratorPoolSpec.model_validate(pools[p.accelerator_pool]) for p in spec.pools}
    (problem,) = check_compatibility(spec, resolved)
    assert problem.decode_pool == "d2" and "share no Multus network" in problem.message
    assert blocked_pools(spec, [problem]) == {"d2"}  # the prefill pool still has d1


def test_injection_is_idempotent_and_unprivileged() -> None:
    profile = kv_profile(accel("h100"), accel("gaudi3"), MODEL, KvTransfer())
    once = inject_sidecar(worker_template(), profile, "decode", Images())
    twice = inject_sidecar(once, profile, "decode", Images())
    assert once == twice
    original = worker_template()
    inject_sidecar(original, profile, "decode", Images())
    assert original == worker_template()  # the input is not modified
    spec = once["spec"]
    assert [c["name"] for c in spec["containers"]] == ["engine", SIDECAR_CONTAINER]
    assert "hostNetwork" not in spec
    sidecar = spec["containers"][1]
    assert sidecar["securityContext"]["privileged"] is False
    assert sidecar["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert sidecar["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert [v for v in spec["volumes"] if v["name"] == "dshm"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    ]
    engine_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert engine_env["UCX_TLS"] == "user-choice"  # a user's setting is kept
    assert engine_env["VLLM_KV_CACHE_LAYOUT"] == "HND"
    engine = spec["containers"][0]
    assert (
        engine["resources"]["limits"] == engine["resources"]["requests"] == {"rdma/rdma_shared_device_a": "1"}
    )
    assert engine["ports"] == [{"name": "nixl-side", "containerPort": 5600, "protocol": "TCP"}]
    # the Gaudi pool lists no network; the template's own Multus annotation is kept as it is
    assert once["metadata"]["annotations"][MULTUS_ANNOTATION] == "default/mgmt"
    nv = inject_sidecar(worker_template(), profile, "prefill", Images())
    assert nv["metadata"]["annotations"][MULTUS_ANNOTATION] == "default/mgmt,kv-fabric/rdma-net"
    assert inject_sidecar(nv, profile, "prefill", Images()) == nv


def test_mixed_pool_gets_its_own_profile() -> None:
    spec = InferenceServiceSpec.model_validate(
        {"model": MODEL.to_wire(), "pools": [{"name": "m", "role": "mixed", "acceleratorPool": "gaudi3"}]}
    )
    profile = pool_profile(spec, spec.pools[0], accels(spec))
    assert profile.prefill == profile.decode and not profile.translate
    tpl = inject_sidecar(worker_template(), profile, "mixed", Images())
    env = {e["name"]: e.get("value") for e in tpl["spec"]["containers"][1]["env"]}
    assert env["TANDEM_KV_ROLE"] == "mixed" and env["TANDEM_KV_BLOCK_SIZE"] == "128"


# ---- KVTransferReady ------------------------------------------------------------------------------


def _condition(spec: InferenceServiceSpec, reports: list[SidecarReport]) -> Any:
    resolved = accels(spec)
    profiles = {p.name: pool_profile(spec, p, resolved) for p in spec.pools}
    return kv_transfer_condition(spec, profiles, check_compatibility(spec, resolved), reports, generation=3)


def test_condition_reasons() -> None:
    rdma = service("h100", "gaudi3")
    ok = [SidecarReport("prefill", "p-0", True, "rdma"), SidecarReport("decode", "d-0", True, "rdma")]
    cond = _condition(rdma, ok)
    assert (cond.type, cond.status, cond.reason, cond.observed_generation) == (
        "KVTransferReady",
        "True",
        "Ready",
        3,
    )
    fallback = _condition(rdma, [ok[0], SidecarReport("decode", "d-0", True, "tcp")])
    assert (fallback.status, fallback.reason) == ("False", "TcpFallback") and "d-0" in fallback.message
    waiting = _condition(rdma, [ok[0], SidecarReport("decode", "d-0", False, None)])
    assert (waiting.status, waiting.reason, waiting.message) == (
        "False", "SidecarNotReady",
        "1 of 2 KV-transfer sidecars are ready (not ready: d-0); a sidecar whose RDMA fell back to TCP "
        "stays not ready and logs why (kubectl logs POD -c kv-sidecar).",
    )  # fmt: skip
    # on a TCP pair, or where the pool accepts TCP, there is no fallback to hint at
    tcp_wait = _condition(service("mi300x", "h100"), [SidecarReport("prefill", "p-0", False, None)])
    assert tcp_wait.message == "0 of 1 KV-transfer sidecars are ready (not ready: p-0)."
    assert _condition(rdma, []).reason == "SidecarNotReady"
    bad = _condition(service("mi300x", "h100", model=FP8_MODEL), ok)
    assert (bad.status, bad.reason) == ("False", "Incompatible")
    # TCP is what was expected on a TCP pair, and an allowed fallback is not a failure
    assert (
        _condition(service("mi300x", "h100"), [SidecarReport("prefill", "p", True, "tcp")]).reason == "Ready"
    )
    allowed = service("mi300x-rdma", "mi300x-rdma")
    assert _condition(allowed, [SidecarReport("prefill", "p", True, "tcp")]).reason == "Ready"
    no_prefill = service("mi300x", "h100").model_copy(update={"pools": [service("mi300x", "h100").pools[1]]})
    every = [cond, fallback, waiting, tcp_wait, bad, _condition(no_prefill, [])]
    assert {c.reason for c in every} == {
        "Ready",
        "TcpFallback",
        "SidecarNotReady",
        "Incompatible",
        "NotDisaggregated",
    }
    for c in every:
        assert is_sentence(c.message), c


def test_status_inputs_parsing() -> None:
    text = (
        '# TYPE tandem_kv_transport gauge\ntandem_kv_transport{transport="rdma"} 0.0\n'
        'tandem_kv_transport{transport="tcp"} 1.0\ntandem_kv_transport{transport="shm"} 0.0\n'
    )
    assert parse_transport(text) == "tcp"
    assert parse_transport("") is None
    pod = {
        "status": {
            "containerStatuses": [{"name": "engine", "ready": True}, {"name": "kv-sidecar", "ready": False}]
        }
    }
    assert sidecar_ready(pod) is False
    ready = copy.deepcopy(pod)
    ready["status"]["containerStatuses"][1]["ready"] = True
    assert sidecar_ready(ready) is True
    assert json.loads(json.dumps(pod))  # plain JSON in, plain values out
    fallback = report_from_readyz(
        "decode", "d-0", 503, {"ready": False, "transport": "tcp", "reason": "TcpFallback"}
    )
    assert fallback == SidecarReport("decode", "d-0", False, "tcp")
    assert report_from_readyz("decode", "d-0", None, None) == SidecarReport("decode", "d-0", False, None)


def test_sidecars_share_one_geometry_across_tp_sizes() -> None:
    spec = service("h100", "gaudi3", tp=(2, 8))
    assert check_compatibility(spec, accels(spec)) == []
    heads = set()
    for pool in spec.pools:
        profile = pool_profile(spec, pool, accels(spec))
        tpl = inject_sidecar(worker_template(), profile, pool.role, Images())
        env = {e["name"]: e.get("value") for e in tpl["spec"]["containers"][1]["env"]}
        heads.add((env["TANDEM_KV_LAYERS"], env["TANDEM_KV_KV_HEADS"], env["TANDEM_KV_HEAD_DIM"]))
    assert heads == {("32", "8", "128")}


def _pod(name: str, pool: str, *, sidecar_ready: bool, ip: str | None = "10.1.2.3") -> dict[str, Any]:
    status: dict[str, Any] = {"containerStatuses": [{"name": "kv-sidecar", "ready": sidecar_ready}]}
    if ip:
        status["podIP"] = ip
    labels = {"inference.tandem.dev/pool": pool, "inference.tandem.dev/role": pool}  # pools named by role
    return {"metadata": {"name": name, "labels": labels}, "status": status}


def test_a_not_ready_sidecar_that_names_tcp_is_a_fallback() -> None:
    """What the operator's probe (tandem.kv_probe) read from /readyz turns SidecarNotReady into
    TcpFallback on an RDMA pair; without an answer it stays SidecarNotReady."""
    from tandem.kv_status import kv_condition_from_pods

    spec = service("h100", "gaudi3")
    pods = [_pod("p-0", "prefill", sidecar_ready=True), _pod("d-0", "decode", sidecar_ready=False)]
    fallback = {"ready": False, "transport": "tcp", "expected": "rdma", "reason": "TcpFallback"}
    cond, _ = kv_condition_from_pods(spec, accels(spec), pods, 3, {"d-0": (503, fallback)})
    assert (cond.status, cond.reason) == ("False", "TcpFallback") and "d-0 (pool decode)" in cond.message
    unknown, _ = kv_condition_from_pods(spec, accels(spec), pods, 3, {"d-0": (None, None)})
    assert unknown.reason == "SidecarNotReady"
    starting = {"ready": False, "transport": "rdma", "expected": "rdma"}  # not ready for another reason
    still, _ = kv_condition_from_pods(spec, accels(spec), pods, 3, {"d-0": (503, starting)})
    assert still.reason == "SidecarNotReady"


def test_only_not_ready_sidecars_with_an_ip_are_asked() -> None:
    from tandem.kv_probe import to_ask

    pods = [
        _pod("ready", "decode", sidecar_ready=True),
        _pod("waiting", "decode", sidecar_ready=False),
        _pod("no-ip", "decode", sidecar_ready=False, ip=None),
        _pod("mixed", "mixed", sidecar_ready=False),
        _pod("v6", "prefill", sidecar_ready=False, ip="fd00::5"),
    ]
    assert to_ask(pods) == {
        "waiting": "http://10.1.2.3:8200/readyz",
        "v6": "http://[fd00::5]:8200/readyz",
    }
