"""Roofline performance model of one inference instance (``tp`` devices of one accelerator).

Units: times in seconds, sizes in bytes or tokens, bandwidths as named (GB/s = 1e9 B/s).

One engine iteration processes ``T`` new prompt tokens (prefill, possibly chunks) and ``B``
decode tokens (one per running sequence) over a total decode context ``C`` tokens::

    t = overhead + comm + max(compute, memory)
    compute  = 2 * P_active * (T + B) / (MFU * peak)  +  4 * L * H * hd * pairs / (attn_eff * peak)
    memory   = (weights_read + C * kv_bytes_per_token) / (MBU * HBM_BW)
    comm     = 2 * L * (allreduce_latency + 2 (tp-1)/tp * (T + B) * d * 2 B / (eff * link/2))   (tp > 1)
    overhead = step + L * layer_overhead(prefill or decode) + per_seq * B

``pairs`` counts causal attention (query, key) pairs: a prompt of ``l`` tokens has ``l^2/2``
(so the attention FLOPs are ``2 * L * d * l^2``); a chunk of ``c`` tokens after ``p`` already
prefilled tokens has ``c * p + c^2 / 2``. All FLOPs and bytes are split evenly over ``tp``.
For mixture-of-experts models a step reads the shared weights plus the experts touched by
its tokens (``1 - (1 - k/E)^n`` of them for ``n`` tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.perf.catalog import Accelerator
from tandem.perf.models import ModelArch

GIB = 1024**3

# vLLM's default gpu_memory_utilization is 0.9; DistServe's OPT-13B/A100 capacity (66k tokens,
# simdistserve/estimators/profile_data max_num_tokens.csv) implies ~0.92 with 1 GiB of
# activation workspace, which is what we use.
GPU_MEMORY_UTILIZATION = 0.92
ACTIVATION_RESERVE_GIB = 1.0

# P->D KV transfer: Splitwise (arXiv 2311.18677, Sec. 4.3/Fig. 15) measured a constant
# non-overlapped part of ~5 ms (H100, 400 Gb/s IB) to ~8 ms (A100, 200 Gb/s) with layer-wise
# transfer; we model it as a setup cost plus one layer's worth of bytes.
KV_TRANSFER_SETUP_S = 0.005
# Achieved fraction of the nominal link rate for bulk RDMA puts (60-80 % is typical).
KV_LINK_EFFICIENCY = 0.7


def _check_tp(tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")


def kv_bytes_per_token(model: ModelArch) -> int:
    """KV-cache bytes per token across the whole model: 2 (K and V) x layers x KV heads x
    head dim x element bytes. Llama-2-70B fp16: 327,680 B."""
    return int(2 * model.layers * model.kv_heads * model.head_dim * model.kv_bytes_per_elem)


def kv_capacity_tokens(acc: Accelerator, model: ModelArch, tp: int) -> int:
    """Tokens of KV cache an instance of ``tp`` devices holds: usable memory (x
    ``GPU_MEMORY_UTILIZATION``) minus weights minus an activation reserve per device,
    divided by :func:`kv_bytes_per_token`. 0 if the weights do not fit."""
    _check_tp(tp)
    usable = tp * (acc.memory_gib * GIB * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_GIB * GIB)
    free = usable - model.weight_bytes
    return max(0, int(free // kv_bytes_per_token(model)))


@dataclass(frozen=True)
class PerfProfile:
    """Precomputed coefficients of :func:`iteration_seconds` for (accelerator, model, tp).

    The simulator calls :meth:`iteration` millions of times, so everything that does not
    depend on the batch is folded into per-token constants here (all in seconds).
    """

    accelerator: Accelerator
    model: ModelArch
    tp: int
    overhead_prefill: float  # fixed part of an iteration that has prefill tokens
    overhead_decode: float  # fixed part of a decode-only iteration
    per_seq: float  # per running decode sequence
    per_token_compute: float  # dense GEMM time per processed token
    per_pair_compute: float  # attention time per causal (query, key) pair
    per_token_comm: float  # all-reduce bandwidth time per processed token
    dense_read: float  # time to stream the non-expert weights once
    expert_read: float  # time to stream all expert weights once (0 for dense)
    per_ctx_read: float  # time to read one token of KV cache
    expert_miss: float  # (1 - k/E) for MoE, 0 for dense
    kv_capacity: int

    def iteration(self, new_tokens: int, pairs: float, batch: int, context: int) -> float:
        """Seconds for one iteration: ``new_tokens`` prefill tokens with ``pairs`` attention
        pairs, plus ``batch`` decode sequences over ``context`` total context tokens."""
        tokens = new_tokens + batch
        compute = tokens * self.per_token_compute + pairs * self.per_pair_compute
        read = self.dense_read + context * self.per_ctx_read
        if self.expert_read:
            read += self.expert_read * (1.0 - self.expert_miss**tokens)
        overhead = self.overhead_prefill if new_tokens else self.overhead_decode
        return overhead + batch * self.per_seq + tokens * self.per_token_comm + max(compute, read)

    def decode_step(self, batch: int, context: int) -> float:
        """Seconds for one decode-only iteration: :meth:`iteration` with no prefill tokens, written
        out (the planner's mixed-pool search calls it hundreds of times per capacity)."""
        compute = batch * self.per_token_compute
        read = self.dense_read + context * self.per_ctx_read
        if self.expert_read:
            read += self.expert_read * (1.0 - self.expert_miss**batch)
        return self.overhead_decode + batch * self.per_seq + batch * self.per_token_comm + max(compute, read)


def _peak_flops(acc: Accelerator, model: ModelArch) -> float:
    tflops = acc.fp8_tflops if model.dtype == "fp8" and acc.fp8_tflops > 0 else acc.bf16_tflops
    return tflops * 1e12


def build_profile(acc: Accelerator, model: ModelArch, tp: int) -> PerfProfile:
    """Fold (accelerator, model, tp) into a :class:`PerfProfile`."""
    _check_tp(tp)
    peak = _peak_flops(acc, model)
    bw = acc.memory_bw_gbs * 1e9 * acc.mbu
    layers = model.layers
    allreduce_fixed = 2 * layers * acc.allreduce_latency_s if tp > 1 else 0.0
    if tp > 1:
        ring = 2.0 * (tp - 1) / tp
        ar_bw = acc.allreduce_efficiency * acc.link_gbs * 1e9 / 2.0
        per_token_comm = 2 * layers * ring * model.hidden_size * 2.0 / ar_bw
    else:
        per_token_comm = 0.0
    expert_bytes = model.expert_params * model.bytes_per_param
    attn_width = model.attention_width
    miss = 1.0 - model.experts_per_token / model.num_experts if model.is_moe else 0.0
    return PerfProfile(
        accelerator=acc,
        model=model,
        tp=tp,
        overhead_prefill=acc.step_overhead_s + layers * acc.layer_overhead_prefill_s + allreduce_fixed,
        overhead_decode=acc.step_overhead_s + layers * acc.layer_overhead_decode_s + allreduce_fixed,
        per_seq=acc.per_seq_overhead_s,
        per_token_compute=2.0 * model.active_params / tp / (acc.mfu * peak),
        per_pair_compute=4.0 * layers * attn_width / tp / (acc.attn_efficiency * peak),
        per_token_comm=per_token_comm,
        dense_read=(model.weight_bytes - expert_bytes) / tp / bw,
        expert_read=expert_bytes / tp / bw,
        per_ctx_read=kv_bytes_per_token(model) / tp / bw,
        expert_miss=miss,
        kv_capacity=kv_capacity_tokens(acc, model, tp),
    )


def prefill_seconds(acc: Accelerator, model: ModelArch, tp: int, prompt_tokens: int | Sequence[int]) -> float:
    """Seconds to prefill one prompt (an int, in tokens) or a batch of prompts (a sequence
    of prompt lengths) in a single iteration on ``tp`` devices of ``acc``."""
    lengths = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    if any(n < 0 for n in lengths):
        raise ValueError("prompt lengths must be >= 0")
    total = sum(lengths)
    if total == 0:
        return 0.0
    pairs = sum(n * n / 2.0 for n in lengths)
    return build_profile(acc, model, tp).iteration(total, pairs, 0, 0)


def decode_step_seconds(
    acc: Accelerator, model: ModelArch, tp: int, batch: int, context_tokens: int
) -> float:
    """Seconds for one decode iteration of ``batch`` sequences whose contexts add up to
    ``context_tokens`` tokens (the total across the batch, not per sequence)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return build_profile(acc, model, tp).decode_step(batch, max(0, context_tokens))


def kv_transfer_seconds(
    model: ModelArch,
    prompt_tokens: int,
    link_gbs: float,
    pipelined: bool = True,
    *,
    compute_seconds: float | None = None,
    setup_seconds: float = KV_TRANSFER_SETUP_S,
    link_efficiency: float = KV_LINK_EFFICIENCY,
) -> float:
    """Exposed seconds to move a prompt's KV cache from a prefill to a decode instance.

    ``link_gbs``: aggregate link bandwidth between the two instances in GB/s (for example
    8 x 400 Gb/s InfiniBand = 400 GB/s). Serialized (``pipelined=False``): setup + all bytes.
    Layer-by-layer (``pipelined=True``) transfer overlaps with the prefill, leaving setup +
    one layer's bytes exposed, or, if ``compute_seconds`` (the prefill time) is given and
    the link is slower than the compute, the part of the transfer the compute cannot hide.
    """
    if link_gbs <= 0:
        raise ValueError(f"link_gbs must be positive, got {link_gbs}")
    full = prompt_tokens * kv_bytes_per_token(model) / (link_efficiency * link_gbs * 1e9)
    if not pipelined:
        return setup_seconds + full
    one_layer = full / model.layers
    exposed = one_layer if compute_seconds is None else max(one_layer, full - compute_seconds)
    return setup_seconds + exposed


def max_tokens_fit(profile: PerfProfile) -> int:
    """Largest single request (prompt + output tokens) an instance can hold in KV."""
    return min(profile.kv_capacity, profile.model.max_model_len)


def smallest_tp(
    acc: Accelerator, model: ModelArch, min_kv_tokens: int = 32768, max_tp: int = 8
) -> int | None:
    """Smallest power-of-two TP (<= ``max_tp``) whose KV capacity holds ``min_kv_tokens``."""
    tp = 1
    while tp <= max_tp:
        if kv_capacity_tokens(acc, model, tp) >= min_kv_tokens:
            return tp
        tp *= 2
    return None


def ceil_div(a: float, b: float) -> int:
    return math.ceil(a / b)
