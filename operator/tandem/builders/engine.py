"""Engine command lines per engine (vLLM, SGLang, Tandem's simulated worker) and role."""

from __future__ import annotations

import json

from tandem import names
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec, PoolSpec

# Where the engine stages KV blocks for NIXL. NVIDIA and AMD (ROCm builds of torch name their
# devices "cuda") transfer from device memory; vLLM's Gaudi plugin stages through host memory.
KV_BUFFER_DEVICE_BY_VENDOR = {"nvidia": "cuda", "amd": "cuda", "intel": "cpu", "other": "cpu"}

# vLLM's connector names (vllm/distributed/kv_transfer/kv_connector/factory.py).
VLLM_CONNECTORS = {
    "nixl": "NixlConnector",
    "mooncake": "MooncakeConnectorV1",
    "lmcache": "LMCacheConnectorV1",
}


def kv_buffer_device(accel: AcceleratorPoolSpec) -> str:
    return accel.engine.kv_buffer_device or KV_BUFFER_DEVICE_BY_VENDOR[accel.vendor]


def model_ref(spec: InferenceServiceSpec) -> str:
    return spec.model.source or spec.model.name


def vllm_args(spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec) -> list[str]:
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
        config = {
            "kv_connector": VLLM_CONNECTORS[spec.kv_transfer.connector],
            # vLLM's NIXL connector is symmetric: both sides register as kv_both and the
            # router's kv_transfer_params decide who sends and who pulls.
            "kv_role": "kv_both",
            "kv_buffer_device": kv_buffer_device(accel),
        }
        args += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    return args


def sglang_args(spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec) -> list[str]:
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
    ]
    if spec.model.max_model_len:
        args += ["--context-length", str(spec.model.max_model_len)]
    if pool.role in ("prefill", "decode"):
        backend = "nixl" if spec.kv_transfer.connector == "nixl" else "mooncake"
        args += ["--disaggregation-mode", pool.role, "--disaggregation-transfer-backend", backend]
    return args


def sim_args(spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec) -> list[str]:
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
    return args


def engine_args(spec: InferenceServiceSpec, pool: PoolSpec, accel: AcceleratorPoolSpec) -> list[str]:
    """The full command line of a worker container, extra user arguments last."""
    builder = {"vllm": vllm_args, "sglang": sglang_args, "sim": sim_args}[spec.engine]
    return builder(spec, pool, accel) + list(pool.args)
