"""Model architecture presets for the performance model.

Shapes come from each model's published ``config.json`` on Hugging Face (cited per entry).
``params`` is the total parameter count; ``active_params`` the parameters touched per
token (equal to ``params`` for dense models). ``expert_params`` is the share of ``params``
that lives in routed experts (0 for dense models); it decides how much of the weights a
decode step streams at a given batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

DType = Literal["fp16", "bf16", "fp8"]

DTYPE_BYTES: dict[str, float] = {"fp16": 2.0, "bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class ModelArch:
    """A transformer's shape. ``bytes_per_param`` follows ``dtype``; so does the KV cache
    element size ``kv_bytes_per_elem`` (fp8 checkpoints are served with an fp8 KV cache, as
    vLLM's ``--kv-cache-dtype fp8``)."""

    name: str
    params: float
    active_params: float
    layers: int
    hidden_size: int
    kv_heads: int
    head_dim: int
    dtype: DType
    bytes_per_param: float
    max_model_len: int
    kv_bytes_per_elem: float = 2.0
    num_heads: int = 0  # query heads; 0 = hidden_size // head_dim
    num_experts: int = 0
    experts_per_token: int = 0
    expert_params: float = 0.0

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (all experts) at ``dtype``."""
        return self.params * self.bytes_per_param

    @property
    def attention_width(self) -> int:
        """Query heads x head dim (equals hidden_size except for models like Qwen3-MoE)."""
        return (self.num_heads or self.hidden_size // self.head_dim) * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _dense(
    name: str,
    params: float,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: DType,
    max_len: int,
) -> ModelArch:
    b = DTYPE_BYTES[dtype]
    return ModelArch(
        name, params, params, layers, hidden, kv_heads, head_dim, dtype, b, max_len, b, num_heads=heads
    )


MODEL_PRESETS: dict[str, ModelArch] = {
    # facebook/opt-13b config.json: 40 layers, hidden 5120, 40 heads (MHA), 12.85e9 params,
    # max_position_embeddings 2048. FP16, as in DistServe's calibration (arXiv 2401.09670).
    "opt-13b": _dense("opt-13b", 12.85e9, 40, 5120, 40, 40, 128, "fp16", 2048),
    # meta-llama/Llama-2-70b-hf config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads (GQA),
    # 68.98e9 params, 4096 context. FP16, as in Splitwise (arXiv 2311.18677).
    "llama-2-70b": _dense("llama-2-70b", 68.98e9, 80, 8192, 64, 8, 128, "fp16", 4096),
    # meta-llama/Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads, 8.03e9
    # params, 131072 context.
    "llama-3.1-8b": _dense("llama-3.1-8b", 8.03e9, 32, 4096, 32, 8, 128, "bf16", 131072),
    # meta-llama/Llama-3.1-70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, 70.55e9.
    "llama-3.1-70b": _dense("llama-3.1-70b", 70.55e9, 80, 8192, 64, 8, 128, "bf16", 131072),
    # meta-llama/Llama-3.1-405B config.json: 126 layers, hidden 16384, 128 heads, 8 KV heads, 405.85e9.
    "llama-3.1-405b": _dense("llama-3.1-405b", 405.85e9, 126, 16384, 128, 8, 128, "bf16", 131072),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads,
    # 8 experts / 2 per token, expert FFN 3 x 4096 x 14336 -> 45.1e9 expert params of 46.7e9;
    # 12.9e9 active (Mistral AI announcement, 2023-12).
    "mixtral-8x7b": ModelArch(
        name="mixtral-8x7b",
        params=46.7e9,
        active_params=12.9e9,
        layers=32,
        hidden_size=4096,
        kv_heads=8,
        head_dim=128,
        dtype="bf16",
        bytes_per_param=2.0,
        max_model_len=32768,
        kv_bytes_per_elem=2.0,
        num_heads=32,
        num_experts=8,
        experts_per_token=2,
        expert_params=45.1e9,
    ),
    # Qwen/Qwen3-235B-A22B config.json: 94 layers, hidden 4096, 64 heads of 128, 4 KV heads,
    # 128 experts / 8 per token, moe_intermediate 1536 -> 3 x 4096 x 1536 x 128 x 94 = 227.1e9
    # expert params; 235.1e9 total, 22.1e9 active (Qwen3 technical report, arXiv 2505.09388).
    "qwen3-235b-a22b": ModelArch(
        name="qwen3-235b-a22b",
        params=235.1e9,
        active_params=22.1e9,
        layers=94,
        hidden_size=4096,
        kv_heads=4,
        head_dim=128,
        dtype="bf16",
        bytes_per_param=2.0,
        max_model_len=40960,
        kv_bytes_per_elem=2.0,
        num_heads=64,
        num_experts=128,
        experts_per_token=8,
        expert_params=227.1e9,
    ),
}


def get_model(name: str, dtype: str | None = None) -> ModelArch:
    """Look up a preset by name (case-insensitive) and optionally re-type it.

    ``dtype`` ("fp16", "bf16" or "fp8") sets weight and KV-cache element sizes.
    Raises ``KeyError`` listing the known presets, ``ValueError`` for an unknown dtype.
    """
    key = name.strip().lower()
    try:
        arch = MODEL_PRESETS[key]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}") from None
    if dtype is None or dtype == arch.dtype:
        return arch
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    b = DTYPE_BYTES[dtype]
    return replace(arch, dtype=dtype, bytes_per_param=b, kv_bytes_per_elem=b)  # type: ignore[arg-type]
