"""KV-cache transfer wiring (pure): per-vendor KV profiles, the prefill/decode compatibility check,
and the KV-transfer sidecar's injection into worker pod templates.

Everything here is a function of the AcceleratorPools, the model and ``spec.kvTransfer``: no I/O,
no clock, no environment. The sidecar it configures lives in ``tandem.sidecar`` and its contract
(ports, env, endpoints) in ``worker-images/kv-sidecar/README.md``.

Sources for the per-vendor numbers:

- KV buffer device: vLLM's NIXL connector stages from device memory on CUDA and ROCm (ROCm builds of
  torch name their devices ``cuda``); the Gaudi plugin (vllm-gaudi) stages through host memory.
- Block size: 16 tokens, vLLM's default on CUDA and ROCm; 128 on Gaudi (vllm-gaudi's default, the
  size its paged attention is tuned for).
- Layout: vLLM's FlashAttention/ROCm backends keep ``NHD`` (token-major) blocks; vllm-gaudi keeps
  ``HND`` (head-major). ``VLLM_KV_CACHE_LAYOUT`` overrides vLLM's choice.
- FP8 KV caches: CDNA3 (MI300X, MI325X) uses ``float8_e4m3fnuz``, NVIDIA and Gaudi 3 the OCP
  ``float8_e4m3fn``. The two encode the same bits differently and the sidecar moves bits, so such a
  pair is refused instead of silently corrupting the cache.
- UCX transports: ``rc`` (reliable connection over InfiniBand/RoCE) for RDMA, ``tcp`` otherwise,
  ``cuda_copy``/``rocm_copy`` where the engine's buffer lives in device memory, ``sm,self`` always.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tandem.builders.common import Images
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec, KvTransfer, ModelSpec, PoolSpec
from tandem.perf.models import MODEL_PRESETS
from tandem.resolve import Problem

FabricType = Literal["rdma", "tcp"]
Layout = Literal["NHD", "HND"]
RoleName = Literal["prefill", "decode", "mixed"]

# ---- names the sidecar, the engine and the status reader share --------------------------------
SIDECAR_CONTAINER = "kv-sidecar"
SIDECAR_IMAGE = "kv-sidecar"  # under Images.registry, tagged like every Tandem image
SIDECAR_PORT = 8200  # HTTP: /readyz, /livez, /metrics, /v1/...
SIDECAR_PORT_NAME = "kv-http"
SIDECAR_URL = f"http://127.0.0.1:{SIDECAR_PORT}"  # how the engine container reaches its sidecar
NIXL_SIDE_CHANNEL_PORT = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
NIXL_SIDE_CHANNEL_PORT_NAME = "nixl-side"
MULTUS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
PROFILE_ANNOTATION = "inference.tandem.dev/kv-profile"
SHM_VOLUME = "dshm"
CONDITION_TYPE = "KVTransferReady"
# env of the sidecar container (documented in worker-images/kv-sidecar/README.md)
ENV_PREFIX = "TANDEM_KV_"
ENV_SIDECAR_URL = "TANDEM_KV_SIDECAR_URL"  # set on the engine containers

KV_BUFFER_DEVICE_BY_VENDOR: Mapping[str, str] = {
    "nvidia": "cuda",
    "amd": "cuda",
    "intel": "cpu",
    "other": "cpu",
}
BLOCK_SIZE_BY_VENDOR: Mapping[str, int] = {"nvidia": 16, "amd": 16, "intel": 128, "other": 16}
LAYOUT_BY_VENDOR: Mapping[str, Layout] = {"nvidia": "NHD", "amd": "NHD", "intel": "HND", "other": "NHD"}
DEVICE_TLS_BY_VENDOR: Mapping[str, str] = {"nvidia": "cuda_copy", "amd": "rocm_copy"}
FP8_FNUZ_MODELS = frozenset({"MI300X", "MI325X"})
NIXL_BACKEND_BY_TRANSPORT: Mapping[str, str] = {"ucx": "UCX", "libfabric": "LIBFABRIC"}
VLLM_CONNECTORS: Mapping[str, str] = {
    "nixl": "NixlConnector",
    "mooncake": "MooncakeConnectorV1",
    "lmcache": "LMCacheConnectorV1",
}
SIDECAR_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "8Gi"}}


@dataclass(frozen=True)
class KvShape:
    """The KV-relevant shape of a model (per layer, whole model: tensor parallelism splits heads)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # bf16 | fp16 | fp8 (the KV cache's element type)

    @property
    def dtype_bytes(self) -> int:
        return 1 if self.dtype.startswith("fp8") else 2

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "fp8": "fp8", "auto": "bf16"}


def kv_shape(model: ModelSpec) -> KvShape:
    """The model's KV shape from its preset or architecture (unknown preset: Llama-3.1-8B's)."""
    if model.architecture is not None:
        a = model.architecture
        return KvShape(a.layers, a.kv_heads, a.head_dim, _DTYPE_NAMES[a.dtype])
    arch = MODEL_PRESETS.get(model.preset or "", MODEL_PRESETS["llama-3.1-8b"])
    return KvShape(
        arch.layers, arch.kv_heads, arch.head_dim, "fp8" if arch.kv_bytes_per_elem == 1 else arch.dtype
    )


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def kv_dtype(shape: KvShape, accel: AcceleratorPoolSpec, pool: PoolSpec | None = None) -> str:
    """The KV element encoding a pool's engine uses: the model's, or ``--kv-cache-dtype`` from the
    pool's args; FP8 is spelled with the vendor's encoding (``fp8_e4m3fnuz`` on CDNA3)."""
    dtype = shape.dtype
    override = _arg_value(pool.args, "--kv-cache-dtype") if pool is not None else None
    if override and override != "auto":
        dtype = "fp8" if override.startswith("fp8") else override
    if dtype == "fp8":
        return "fp8_e4m3fnuz" if accel.model in FP8_FNUZ_MODELS else "fp8_e4m3fn"
    return dtype


@dataclass(frozen=True)
class KvEndpoint:
    """One side of a transfer: how its engine keeps KV and how its sidecar reaches peers."""

    vendor: str
    accelerator: str
    kv_buffer_device: str
    layout: Layout
    block_size: int
    kv_dtype: str
    tensor_parallel_size: int
    fabric: FabricType  # what this pool's AcceleratorPool offers
    nixl_backend: str  # UCX | LIBFABRIC
    ucx_tls: str
    rdma_resource: tuple[str, int] | None
    networks: tuple[str, ...]
    allow_tcp_fallback: bool


@dataclass(frozen=True)
class KvProfile:
    """A prefill -> decode pair: both endpoints, the fabric they will use, the translation needed."""

    prefill: KvEndpoint
    decode: KvEndpoint
    shape: KvShape
    connector: str
    fabric: FabricType  # what the pair runs on: RDMA only if both ends have it and the service allows it
    requested: Literal["auto", "rdma", "tcp"]
    translate: bool  # the decode sidecar re-lays blocks out (layout or block size differ)

    def endpoint(self, role: RoleName) -> KvEndpoint:
        return self.prefill if role == "prefill" else self.decode

    def expected_transport(self, role: RoleName) -> FabricType:
        """What the sidecar on ``role`` must see UCX select; anything else is a TCP fallback."""
        end = self.endpoint(role)
        return "rdma" if self.fabric == "rdma" and end.fabric == "rdma" else "tcp"

    def kv_role(self, role: RoleName) -> str:
        # vLLM's NIXL connector is symmetric (kv_both): the router's kv_transfer_params decide who
        # pulls. LMCache and Mooncake disaggregation name the producer and the consumer.
        if self.connector == "nixl" or role == "mixed":
            return "kv_both"
        return "kv_producer" if role == "prefill" else "kv_consumer"

    def vllm_kv_transfer_config(self, role: RoleName) -> dict[str, Any]:
        end = self.endpoint(role)
        config: dict[str, Any] = {
            "kv_connector": VLLM_CONNECTORS[self.connector],
            "kv_role": self.kv_role(role),
            "kv_buffer_device": end.kv_buffer_device,
        }
        if self.connector == "nixl":
            config["kv_connector_extra_config"] = {"backends": [end.nixl_backend]}
        return config

    def engine_env(self, role: RoleName) -> list[dict[str, Any]]:
        """Env of the engine container: layout, NIXL side channel, UCX transports, the sidecar."""
        end = self.endpoint(role)
        return [
            {"name": "VLLM_KV_CACHE_LAYOUT", "value": end.layout},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_SIDE_CHANNEL_PORT)},
            {
                "name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}},
            },
            {"name": "UCX_TLS", "value": end.ucx_tls},
            {"name": ENV_SIDECAR_URL, "value": SIDECAR_URL},
        ]

    def summary(self) -> dict[str, Any]:
        """A compact, stable description (the pod annotation; also handy in Events)."""
        return {
            "fabric": self.fabric,
            "connector": self.connector,
            "translate": self.translate,
            "prefill": f"{self.prefill.vendor}/{self.prefill.layout}/{self.prefill.block_size}",
            "decode": f"{self.decode.vendor}/{self.decode.layout}/{self.decode.block_size}",
        }


def _ucx_tls(vendor: str, buffer_device: str, fabric: FabricType) -> str:
    tls = ["rc", "tcp"] if fabric == "rdma" else ["tcp"]
    if buffer_device != "cpu" and vendor in DEVICE_TLS_BY_VENDOR:
        tls.append(DEVICE_TLS_BY_VENDOR[vendor])
    return ",".join([*tls, "sm", "self"])


def kv_endpoint(
    accel: AcceleratorPoolSpec, shape: KvShape, kv_transfer: KvTransfer, pool: PoolSpec | None = None
) -> KvEndpoint:
    """One pool's side of the wiring, from its AcceleratorPool (explicit engine settings win)."""
    fabric: FabricType = "rdma" if accel.fabric.type == "rdma" and kv_transfer.fabric != "tcp" else "tcp"
    device = accel.engine.kv_buffer_device or KV_BUFFER_DEVICE_BY_VENDOR[accel.vendor]
    rdma = accel.fabric.rdma_resource
    return KvEndpoint(
        vendor=accel.vendor,
        accelerator=accel.model,
        kv_buffer_device=device,
        layout=accel.engine.kv_cache_layout or LAYOUT_BY_VENDOR[accel.vendor],
        block_size=BLOCK_SIZE_BY_VENDOR[accel.vendor],
        kv_dtype=kv_dtype(shape, accel, pool),
        tensor_parallel_size=pool.tensor_parallel_size if pool is not None else 1,
        fabric=fabric,
        nixl_backend=NIXL_BACKEND_BY_TRANSPORT[accel.fabric.transport],
        ucx_tls=_ucx_tls(accel.vendor, device, fabric),
        rdma_resource=(rdma.name, rdma.count) if rdma is not None and fabric == "rdma" else None,
        networks=tuple(accel.fabric.networks),
        allow_tcp_fallback=accel.fabric.allow_tcp_fallback,
    )


def kv_profile(
    prefill_accel: AcceleratorPoolSpec,
    decode_accel: AcceleratorPoolSpec,
    model: ModelSpec,
    kv_transfer: KvTransfer,
    *,
    prefill_pool: PoolSpec | None = None,
    decode_pool: PoolSpec | None = None,
) -> KvProfile:
    """The derived KV wiring of a prefill -> decode pair (``prefill_accel is decode_accel`` for a
    mixed pool's own profile). ``fabric: auto`` picks RDMA when both ends have it."""
    shape = kv_shape(model)
    p = kv_endpoint(prefill_accel, shape, kv_transfer, prefill_pool)
    d = kv_endpoint(decode_accel, shape, kv_transfer, decode_pool)
    fabric: FabricType = "rdma" if p.fabric == "rdma" and d.fabric == "rdma" else "tcp"
    return KvProfile(
        prefill=p,
        decode=d,
        shape=shape,
        connector=kv_transfer.connector,
        fabric=fabric,
        requested=kv_transfer.fabric,
        translate=(p.layout, p.block_size) != (d.layout, d.block_size),
    )


# ---- compatibility ------------------------------------------------------------------------------

INCOMPATIBLE = "Incompatible"


@dataclass(frozen=True)
class PairProblem(Problem):
    """A `Problem` about one prefill -> decode pair (reason ``Incompatible``)."""

    prefill_pool: str = ""
    decode_pool: str = ""


def _fabric_problem(
    profile: KvProfile, p_accel: AcceleratorPoolSpec, d_accel: AcceleratorPoolSpec
) -> str | None:
    p, d = profile.prefill, profile.decode
    if profile.requested == "rdma":
        missing = [name for name, a in (("prefill", p_accel), ("decode", d_accel)) if a.fabric.type != "rdma"]
        if missing:
            return f"kvTransfer.fabric is rdma but the {' and '.join(missing)} side has no RDMA fabric"
    if profile.fabric == "rdma":
        if p.nixl_backend != d.nixl_backend:
            return (
                f"the ends use different RDMA transports ({p_accel.fabric.transport} and "
                f"{d_accel.fabric.transport}); NIXL needs the same backend on both"
            )
        if p.networks and d.networks and not set(p.networks) & set(d.networks):
            return (
                f"the ends share no Multus network (prefill {', '.join(p.networks)}; "
                f"decode {', '.join(d.networks)})"
            )
    return None


def pair_problems(
    spec: InferenceServiceSpec,
    prefill_pool: PoolSpec,
    decode_pool: PoolSpec,
    prefill_accel: AcceleratorPoolSpec,
    decode_accel: AcceleratorPoolSpec,
) -> list[str]:
    """Why a prefill pool cannot hand its KV to a decode pool (empty: compatible)."""
    profile = kv_profile(
        prefill_accel,
        decode_accel,
        spec.model,
        spec.kv_transfer,
        prefill_pool=prefill_pool,
        decode_pool=decode_pool,
    )
    p, d = profile.prefill, profile.decode
    reasons: list[str] = []
    if p.kv_dtype != d.kv_dtype:
        reasons.append(
            f"KV cache dtypes differ ({p.kv_dtype} on {p.accelerator}, {d.kv_dtype} on {d.accelerator}) "
            "and the sidecar moves bits, it does not convert numbers"
        )
    tp_p, tp_d = p.tensor_parallel_size, d.tensor_parallel_size
    if tp_d % tp_p and tp_p % tp_d:
        reasons.append(f"tensor-parallel sizes {tp_p} and {tp_d} are not multiples of each other")
    elif tp_p > tp_d and spec.engine == "vllm":
        # vLLM's NIXL connector maps each decode rank onto whole prefill ranks: decode TP >= prefill TP.
        reasons.append(
            f"prefill tensorParallelSize {tp_p} is larger than decode's {tp_d}; vLLM's NIXL connector "
            "needs decode TP >= prefill TP"
        )
    if spec.engine == "sglang" and profile.translate:
        reasons.append(
            f"SGLang moves KV without Tandem's sidecar, so it cannot translate {p.layout}/{p.block_size} "
            f"blocks to {d.layout}/{d.block_size}"
        )
    fabric = _fabric_problem(profile, prefill_accel, decode_accel)
    if fabric:
        reasons.append(fabric)
    return reasons


def check_compatibility(
    spec: InferenceServiceSpec, accelerator_pools: Mapping[str, AcceleratorPoolSpec]
) -> list[PairProblem]:
    """One `PairProblem` per incompatible (prefill pool, decode pool) pair, in spec order.

    ``accelerator_pools`` maps pool name -> AcceleratorPool spec (`ServiceContext.accelerator_pools`);
    pools missing from it (unresolved) are skipped: resolve() reports those.
    """
    problems: list[PairProblem] = []
    for p in spec.pools_by_role("prefill"):
        for d in spec.pools_by_role("decode"):
            if p.name not in accelerator_pools or d.name not in accelerator_pools:
                continue
            reasons = pair_problems(spec, p, d, accelerator_pools[p.name], accelerator_pools[d.name])
            if reasons:
                problems.append(
                    PairProblem(
                        INCOMPATIBLE,
                        f"prefill pool {p.name!r} ({accelerator_pools[p.name].model}) cannot hand KV "
                        f"to decode pool {d.name!r} ({accelerator_pools[d.name].model}): "
                        + "; ".join(reasons),
                        prefill_pool=p.name,
                        decode_pool=d.name,
                    )
                )
    return problems


def blocked_pools(spec: InferenceServiceSpec, problems: Sequence[PairProblem]) -> set[str]:
    """Pools not to roll out: a prefill or decode pool with no compatible counterpart left."""
    bad = {(pp.prefill_pool, pp.decode_pool) for pp in problems}
    prefills = [p.name for p in spec.pools_by_role("prefill")]
    decodes = [d.name for d in spec.pools_by_role("decode")]
    blocked = {p for p in prefills if all((p, d) in bad for d in decodes)}
    if prefills:
        blocked |= {d for d in decodes if all((p, d) in bad for p in prefills)}
    return blocked


def pool_profile(
    spec: InferenceServiceSpec, pool: PoolSpec, accelerator_pools: Mapping[str, AcceleratorPoolSpec]
) -> KvProfile:
    """The profile a pool's sidecar is configured from: paired with its first counterpart in spec
    order (a prefill pool with the first decode pool and vice versa), a mixed pool with itself.

    The sidecar's own side (its endpoint) does not depend on the counterpart; only the expected
    transport does, and that is RDMA only if every counterpart has RDMA too.
    """
    accel = accelerator_pools[pool.name]
    if pool.role == "mixed":
        return kv_profile(accel, accel, spec.model, spec.kv_transfer, prefill_pool=pool, decode_pool=pool)
    others = [
        q
        for q in spec.pools_by_role("decode" if pool.role == "prefill" else "prefill")
        if q.name in accelerator_pools
    ]
    candidates = [
        kv_profile(
            accel, accelerator_pools[q.name], spec.model, spec.kv_transfer, prefill_pool=pool, decode_pool=q
        )
        if pool.role == "prefill"
        else kv_profile(
            accelerator_pools[q.name], accel, spec.model, spec.kv_transfer, prefill_pool=q, decode_pool=pool
        )
        for q in others
    ]
    if not candidates:
        return kv_profile(accel, accel, spec.model, spec.kv_transfer, prefill_pool=pool, decode_pool=pool)
    if any(c.fabric == "tcp" for c in candidates):
        return next(c for c in candidates if c.fabric == "tcp")
    return candidates[0]


# ---- sidecar injection --------------------------------------------------------------------------


def sidecar_env(profile: KvProfile, role: RoleName) -> list[dict[str, Any]]:
    end = profile.endpoint(role)
    s = profile.shape
    pairs = [
        ("ROLE", role),
        ("VENDOR", end.vendor),
        ("LAYERS", str(s.layers)),
        # the pod's whole KV (all its tensor-parallel ranks' heads): the same geometry on both sides
        # whatever the two pools' TP sizes, so the sidecars never re-shard heads
        ("KV_HEADS", str(s.kv_heads)),
        ("HEAD_DIM", str(s.head_dim)),
        ("DTYPE", end.kv_dtype),
        ("LAYOUT", end.layout),
        ("BLOCK_SIZE", str(end.block_size)),
        ("BACKEND", end.nixl_backend),
        ("EXPECT_TRANSPORT", profile.expected_transport(role)),
        ("ALLOW_TCP_FALLBACK", "true" if end.allow_tcp_fallback else "false"),
        ("PORT", str(SIDECAR_PORT)),
    ]
    env: list[dict[str, Any]] = [{"name": ENV_PREFIX + k, "value": v} for k, v in pairs]
    env += [
        {"name": "UCX_TLS", "value": end.ucx_tls},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
    ]
    return env


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": SIDECAR_PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 3,
        "successThreshold": 1,
    }


def sidecar_container(profile: KvProfile, role: RoleName, images: Images) -> dict[str, Any]:
    end = profile.endpoint(role)
    resources: dict[str, dict[str, str]] = copy.deepcopy(SIDECAR_RESOURCES)
    if end.rdma_resource is not None:
        name, count = end.rdma_resource
        resources["requests"][name] = str(count)
        resources["limits"][name] = str(count)
    resources = {k: dict(sorted(v.items())) for k, v in resources.items()}
    return {
        "name": SIDECAR_CONTAINER,
        "image": images.ref(SIDECAR_IMAGE),
        "command": ["python", "-m", "tandem.sidecar"],
        "ports": [{"name": SIDECAR_PORT_NAME, "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        "env": sidecar_env(profile, role),
        "resources": resources,
        "startupProbe": _probe("/livez", period=2, failures=60),
        "readinessProbe": _probe("/readyz", period=5, failures=3),
        "livenessProbe": _probe("/livez", period=10, failures=6),
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        # RDMA needs to pin (mlock) its registered buffers: IPC_LOCK, and nothing else.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["IPC_LOCK"], "drop": ["ALL"]},
        },
    }


def _merge_env(env: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``env`` plus ``extra``; variables the user already set (same name) are kept as they are."""
    names = {e["name"] for e in env}
    return env + [e for e in extra if e["name"] not in names]


def _with_resource(resources: Mapping[str, Any], name: str, count: int) -> dict[str, Any]:
    out = {k: dict(v) for k, v in resources.items()}
    for kind in ("requests", "limits"):
        out[kind] = dict(sorted({**out.get(kind, {}), name: str(count)}.items()))
    return out


def _merge_networks(current: str | None, networks: Sequence[str]) -> str:
    have = [n.strip() for n in (current or "").split(",") if n.strip()]
    return ",".join(have + [n for n in networks if n not in have])


def inject_sidecar(
    pod_template: Mapping[str, Any], profile: KvProfile, role: RoleName, images: Images
) -> dict[str, Any]:
    """A copy of ``pod_template`` (``{metadata, spec}``) with the KV-transfer sidecar and its wiring.

    Adds (or replaces) the ``kv-sidecar`` container, the memory-backed ``/dev/shm`` volume, the
    Multus networks annotation, the profile annotation and, on every other container, the env that
    points the engine at its sidecar and sets its KV layout and transports; on prefill and decode
    pods also the NIXL side-channel port and the RDMA resource (the engine's connector uses the
    same device). Idempotent:
    ``inject(inject(t)) == inject(t)``. Never adds ``privileged`` or ``hostNetwork``.
    """
    template = copy.deepcopy(dict(pod_template))
    meta = template.setdefault("metadata", {})
    spec = template.setdefault("spec", {})
    end = profile.endpoint(role)
    annotations = meta.setdefault("annotations", {})
    if end.networks:
        annotations[MULTUS_ANNOTATION] = _merge_networks(annotations.get(MULTUS_ANNOTATION), end.networks)
    annotations[PROFILE_ANNOTATION] = json.dumps(profile.summary(), sort_keys=True, separators=(",", ":"))

    containers = [c for c in spec.get("containers", []) if c.get("name") != SIDECAR_CONTAINER]
    engine_env = profile.engine_env(role)
    side_channel = {
        "name": NIXL_SIDE_CHANNEL_PORT_NAME,
        "containerPort": NIXL_SIDE_CHANNEL_PORT,
        "protocol": "TCP",
    }
    for c in containers:
        c["env"] = _merge_env(list(c.get("env", [])), engine_env)
        ports = list(c.get("ports", []))
        if role != "mixed" and not any(p.get("containerPort") == NIXL_SIDE_CHANNEL_PORT for p in ports):
            c["ports"] = [*ports, side_channel]
        if role != "mixed" and end.rdma_resource is not None:
            # the engine's own NIXL connector moves device-memory KV over the same RDMA device
            c["resources"] = _with_resource(c.get("resources", {}), *end.rdma_resource)
    spec["containers"] = [*containers, sidecar_container(profile, role, images)]

    volumes = list(spec.get("volumes", []))
    if not any(v.get("name") == SHM_VOLUME for v in volumes):
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
    spec["volumes"] = volumes
    return template
