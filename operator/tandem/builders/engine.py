"""Engine command lines per engine (vLLM, SGLang, Tandem's simulated worker) and role."""

from __future__ import annotations

import json

from tandem import names
from tandem.builders.kv import ENV_SIDECAR_URL, KvProfile
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec, PoolSpec


def model_ref(spec: InferenceServiceSpec) -> str:
    return spec.model.source or spec.model.name


def vllm_args(
    spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec, profile: KvProfile
) -> list[str]:
    args = [
        "vllm",
        "serve",
        model_ref(spec),
        "--served-model-name",
        spec.model.name,
        "--port",
        str(names.PORT_HTTP),
        "--tensor-parallel-size",
        str(pool.tensor_parallel_size),
    ]
    if spec.model.max_model_len:
        args += ["--max-model-len", str(spec.model.max_model_len)]
    if pool.role in ("prefill", "decode"):
        config = profile.vllm_kv_transfer_config(pool.role)
        args += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"), sort_keys=True)]
    return args


def sglang_args(
    spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec, profile: KvProfile
) -> list[str]:
    args = [
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_ref(spec),
        "--served-model-name",
        spec.model.name,
        "--host",
        "0.0.0.0",
        "--port",
        str(names.PORT_HTTP),
        "--tp-size",
        str(pool.tensor_parallel_size),
        # SGLang serves no /metrics without it; the planner and the router's load polling read them
        "--enable-metrics",
    ]
    if spec.model.max_model_len:
        args += ["--context-length", str(spec.model.max_model_len)]
    if pool.role in ("prefill", "decode"):
        backend = "nixl" if spec.kv_transfer.connector == "nixl" else "mooncake"
        args += ["--disaggregation-mode", pool.role, "--disaggregation-transfer-backend", backend]
    return args


def sim_args(
    spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec, profile: KvProfile
) -> list[str]:
    args = [
        "tandem-sim-worker",
        "--role",
        pool.role,
        "--model",
        spec.model.preset or "llama-3.1-8b",
        "--served-model-name",
        spec.model.name,
        "--accelerator",
        accel.model,
        "--tp",
        str(pool.tensor_parallel_size),
        "--port",
        str(names.PORT_HTTP),
    ]
    if pool.role in ("prefill", "decode"):
        # the hand-off moves real bytes through the pod's KV sidecar (Kubernetes expands $(VAR))
        args += ["--kv-sidecar", f"$({ENV_SIDECAR_URL})"]
    return args


def engine_args(
    spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec, profile: KvProfile
) -> list[str]:
    """The full command line of a worker container, extra user arguments last. ``profile``: the
    pool's KV-transfer profile (``builders.kv.pool_profile``)."""
    builder = {"vllm": vllm_args, "sglang": sglang_args, "sim": sim_args}[spec.engine]
    return builder(spec, pool, accel, profile) + list(pool.args)
