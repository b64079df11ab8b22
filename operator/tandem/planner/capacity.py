"""Per-replica capacity of a pool at the SLO, from the roofline model (:mod:`tandem.perf`).

Every role is measured in the same unit, *requests per second of a given shape* (mean
prompt ``isl`` and output ``osl`` tokens) that one replica serves while meeting the SLO, so
pools of one role on different accelerators compare by price per unit (WVA's cost-aware
choice, llm-d workload-variant-autoscaler docs/saturation-analyzer.md; perf-anchors §4).

* **prefill**: prompt-token throughput under the TTFT target. A replica batches prompts up
  to its token budget; its p-quantile TTFT is the service time plus the M/M/1 waiting-time
  quantile ``S/(1-rho) * ln(rho/q)`` (q = 1 - attainment), and ``rho`` is the largest load
  that keeps it under the target (the DistServe prefill analysis, arXiv 2401.09670 §3.1,
  uses the same M/D/1-style queue).
* **decode**: the largest batch whose step time stays under the ITL target and whose KV
  reservations (prompt + output per sequence, as vLLM and the simulator reserve) fit the
  cache; Little's law turns it into requests/s (Dynamo's decode sizing at context
  ISL + OSL/2, perf-anchors §3.3).
* **mixed**: both on one replica; a prefill chunk stretches the iterations it shares, so
  the mean ITL is ``step / (1 - rho_prefill)`` (Sarathi-Serve, arXiv 2403.02310 §3).

``correction`` multiplies the model's times (the online correction, >1 = slower than modelled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tandem.perf.catalog import Accelerator
from tandem.perf.model import PerfProfile, build_profile, kv_transfer_seconds
from tandem.perf.models import ModelArch
from tandem.planner.lengths import Spread
from tandem.planner.types import PoolTarget, Tuning

# Token budget of one iteration when the pool does not set one (the simulator's defaults,
# tandem.sim.fleet.DEFAULT_BUDGET; vLLM's max_num_batched_tokens is of the same order).
DEFAULT_BUDGET = {"prefill": 8192, "mixed": 2048, "decode": 0}
# KV link of the simulator: 50 GB/s per device (one 400 Gb/s NIC per GPU, DGX H100).
NIC_GBS_PER_DEVICE = 50.0


@dataclass(frozen=True)
class Capacity:
    """Requests/s of one shape that one replica serves within the SLO, and what limits it."""

    rps: float
    bottleneck: str  # "ttft", "itl", "kv", "seqs", "compute" or "infeasible"


@lru_cache(maxsize=256)
def profile(acc: Accelerator, model: ModelArch, tp: int) -> PerfProfile:
    return build_profile(acc, model, tp)


def _prefill_time(prof: PerfProfile, tokens: int, per_prompt: int) -> float:
    prompts = max(1, tokens // max(1, per_prompt))
    return prof.iteration(tokens, prompts * per_prompt * per_prompt / 2.0, 0, 0)


def prompt_seconds(prof: PerfProfile, length: int, budget: int) -> tuple[float, float]:
    """(seconds of a replica per prompt of ``length`` tokens when it batches at its token
    ``budget``, seconds of that prompt alone). A prompt longer than the budget is prefilled
    in budget-sized chunks, each attending to everything before it (as the simulator and
    vLLM's chunked prefill do), so the attention work stays quadratic in the whole prompt."""
    length = max(1, length)
    if length <= budget:
        per_batch = (budget // length) * length
        return _prefill_time(prof, per_batch, length) / (per_batch / length), _prefill_time(
            prof, length, length
        )
    total = 0.0
    done = 0
    while done < length:
        take = min(budget, length - done)
        total += prof.iteration(take, take * done + take * take / 2.0, 0, 0)
        done += take
    return total, total


def work_seconds(prof: PerfProfile, length: int, budget: int, spread: Spread = ()) -> tuple[float, float]:
    """`prompt_seconds` averaged over the prompt lengths of ``spread`` ((length, probability)
    pairs, see `LengthDist.points`), or at ``length`` when there is none: with heavy-tailed
    prompts the long ones cost more than the mean length says (bench: a MI300X prefill of
    log-normal prompts of mean 1,200 tokens saturates ~20% below the mean's rate)."""
    if not spread:
        return prompt_seconds(prof, length, budget)
    batched = alone = 0.0
    for tokens, weight in spread:
        b, a = prompt_seconds(prof, max(1, round(tokens)), budget)
        batched += weight * b
        alone += weight * a
    return batched, alone


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue of ``servers`` servers and
    ``offered`` = lambda x S erlangs (1 when ``offered >= servers``); Erlang B by its
    recurrence, then C = B / (1 - rho (1 - B)). ``servers = 1`` gives rho (M/M/1)."""
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1.0 - rho * (1.0 - b))


def wait_quantile(rho: float, service_s: float, q: float, servers: int = 1) -> float:
    """M/M/c waiting-time quantile at per-server utilisation ``rho``:
    P(W > t) = C(c, c rho) * exp(-c (1-rho) t / S); at c = 1 the M/M/1 rho * exp(-(1-rho) t / S)."""
    c = max(1, servers)
    wait = erlang_c(c, c * rho)
    if wait <= q:
        return 0.0
    return service_s / (c * (1.0 - rho)) * math.log(wait / q)


def queue_attainment(
    firsts: Sequence[tuple[float, float]], service_s: float, target_s: float, rho: float, servers: int = 1
) -> float:
    """Predicted share of prompts whose first token comes within ``target_s`` on a pool of
    ``servers`` replicas queueing as one (M/M/c, the router sending each prompt to the
    least-loaded replica) at per-replica utilisation ``rho`` and mean work ``service_s``.
    ``firsts``: (seconds to the first token of a prompt alone, weight) over the prompt
    lengths; a prompt meets the target unless it waits longer than its own slack, and one
    slower than the target alone never does. 0 when ``rho >= 1`` or there is no weight."""
    total = sum(w for _, w in firsts)
    if total <= 0 or rho >= 1 or service_s <= 0:
        return 0.0
    c = max(1, servers)
    wait = erlang_c(c, c * max(0.0, rho))
    drain = c * (1.0 - rho) / service_s
    met = sum(
        w * max(0.0, 1.0 - wait * math.exp(-drain * (target_s - f))) for f, w in firsts if f <= target_s
    )
    return met / total


def max_load(
    base_s: float, service_s: float, target_s: float, q: float, cap: float, servers: int = 1
) -> float:
    """Largest utilisation rho <= cap with ``base_s + wait_quantile(rho) <= target_s``."""
    if base_s > target_s:
        return 0.0
    if base_s + wait_quantile(cap, service_s, q, servers) <= target_s:
        return cap
    lo, hi = 0.0, cap
    for _ in range(40):
        mid = (lo + hi) / 2
        if base_s + wait_quantile(mid, service_s, q, servers) <= target_s:
            lo = mid
        else:
            hi = mid
    return lo


def split_first_token_s(
    prof: PerfProfile, model: ModelArch, pool: PoolTarget, length: int, alone_s: float
) -> float:
    """Seconds to a split request's first token at the client: its prefill alone (``alone_s``)
    on ``pool``, the KV hand-off and the decode replica's first step (the first token comes
    from the decode replica, tandem.sim SimConfig.ttft_on_decode)."""
    link = NIC_GBS_PER_DEVICE * pool.tp
    hand_off = kv_transfer_seconds(model, length, link, compute_seconds=alone_s)
    return alone_s + hand_off + prof.decode_step(1, length)


def prefill_capacity(
    pool: PoolTarget,
    model: ModelArch,
    isl: float,
    ttft_s: float,
    q: float,
    tune: Tuning,
    corr: float = 1.0,
    typical: float | None = None,
    spread: Spread = (),
    servers: int = 1,
) -> Capacity:
    """``isl``: mean prompt; ``spread``: the prompt lengths (the work per request is averaged
    over them; default: the mean's); ``typical``: the median prompt, whose latency must meet
    the target (the attainment is over all requests, so with heavy-tailed lengths the
    longest prompts may miss while the mass of them meets it)."""
    prof = profile(pool.accelerator, model, pool.tp)
    length = max(1, round(isl))
    budget = pool.max_batch_tokens or DEFAULT_BUDGET["prefill"]
    per_req_s = work_seconds(prof, length, budget, spread)[0] * corr
    short = max(1, round(min(isl, typical or isl)))
    single_s = prompt_seconds(prof, short, budget)[1] * corr
    first_s = split_first_token_s(prof, model, pool, short, single_s)
    rho = max_load(first_s, per_req_s, ttft_s * tune.ttft_headroom, q, tune.max_utilisation, servers)
    if rho <= 0:
        return Capacity(0.0, "infeasible")
    return Capacity(rho / per_req_s, "ttft" if rho < tune.max_utilisation else "compute")


def _max_batch(prof: PerfProfile, ctx: float, limit: int, step_target: float, corr: float) -> int:
    """Largest batch in [0, limit] whose decode step (batch x ctx tokens of context) <= target."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prof.decode_step(mid, int(mid * ctx)) * corr <= step_target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def decode_capacity(
    pool: PoolTarget, model: ModelArch, isl: float, osl: float, itl_s: float, tune: Tuning, corr: float = 1.0
) -> Capacity:
    prof = profile(pool.accelerator, model, pool.tp)
    osl = max(1.0, osl)
    per_seq_kv = max(1.0, isl + osl)
    kv_limit = int(tune.kv_headroom * prof.kv_capacity / per_seq_kv)
    limit = min(kv_limit, pool.max_seqs)
    batch = _max_batch(prof, isl + osl / 2, limit, itl_s * tune.itl_headroom, corr)
    if batch < 1:
        return Capacity(0.0, "infeasible")
    step = prof.decode_step(batch, int(batch * (isl + osl / 2))) * corr
    if batch == kv_limit:
        why = "kv"
    elif batch == pool.max_seqs:
        why = "seqs"
    else:
        why = "itl"
    return Capacity(tune.max_utilisation * batch / (osl * step), why)


def _mixed_ok(
    decode_step: Callable[[int, int], float],
    first_step: float,
    rate: float,
    isl: float,
    osl: float,
    pf_per_token: float,
    itl_target: float,
    kv_cap: float,
) -> bool:
    """Whether a mixed replica at ``rate`` requests/s keeps its step within ``itl_target``
    and its KV cache within ``kv_cap``; ``first_step`` is ``decode_step(1, int(isl))``."""
    rho_p = rate * isl * pf_per_token
    if rho_p >= 1:
        return False
    per_step = rate * osl
    ctx = isl + osl / 2
    busy = 1 - rho_p
    batch = per_step * first_step
    for _ in range(8):  # fixed point: the batch sets the step, the step sets the batch (Little)
        seqs = math.ceil(batch)
        step = decode_step(seqs if seqs > 1 else 1, int(batch * ctx)) / busy
        batch = per_step * step
    return step <= itl_target and batch * (isl + osl) <= kv_cap


def mixed_capacity(
    pool: PoolTarget,
    model: ModelArch,
    isl: float,
    osl: float,
    ttft_s: float,
    itl_s: float,
    q: float,
    tune: Tuning,
    corr: float = 1.0,
    typical: float | None = None,
    spread: Spread = (),
    servers: int = 1,
) -> Capacity:
    prof = profile(pool.accelerator, model, pool.tp)
    length = max(1, round(isl))
    osl = max(1.0, osl)
    budget = pool.max_batch_tokens or DEFAULT_BUDGET["mixed"]
    pf_per_token = work_seconds(prof, length, budget, spread)[0] * corr / length
    single_s = length * pf_per_token
    short = max(1, round(min(isl, typical or isl)))
    base_s = prompt_seconds(prof, short, budget)[1] * corr
    rho_max = max_load(base_s, single_s, ttft_s * tune.ttft_headroom, q, tune.max_utilisation, servers)
    if rho_max <= 0:
        return Capacity(0.0, "infeasible")
    hi = rho_max / (length * pf_per_token)
    itl_target = itl_s * tune.itl_headroom / corr
    kv_cap = tune.kv_headroom * prof.kv_capacity
    decode_step = prof.decode_step
    first = decode_step(1, int(isl))
    if _mixed_ok(decode_step, first, hi, isl, osl, pf_per_token, itl_target, kv_cap):
        return Capacity(hi, "ttft")
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if _mixed_ok(decode_step, first, mid, isl, osl, pf_per_token, itl_target, kv_cap):
            lo = mid
        else:
            hi = mid
    return Capacity(lo, "itl") if lo > 0 else Capacity(0.0, "infeasible")


def capacity(
    pool: PoolTarget,
    model: ModelArch,
    isl: float,
    osl: float,
    ttft_s: float,
    itl_s: float,
    attainment: float,
    tune: Tuning,
    corr: float = 1.0,
    typical: float | None = None,
    spread: Spread = (),
    servers: int = 1,
) -> Capacity:
    """Per-replica capacity of ``pool`` for requests of mean shape (isl, osl); ``typical``
    is the median prompt (the latency target is met at it; default: the mean); ``spread``
    the prompt lengths the prefill work is averaged over (default: the mean's).

    Memoised: a decision prices the same pool at the same shape for several thresholds
    (sizing, routing, the final plan), and the mixed model's search costs ~0.5 ms."""
    return _capacity(pool, model, isl, osl, ttft_s, itl_s, attainment, tune, corr, typical, spread, servers)


@lru_cache(maxsize=4096)
def _capacity(
    pool: PoolTarget,
    model: ModelArch,
    isl: float,
    osl: float,
    ttft_s: float,
    itl_s: float,
    attainment: float,
    tune: Tuning,
    corr: float,
    typical: float | None,
    spread: Spread,
    servers: int,
) -> Capacity:
    q = max(1e-3, 1.0 - attainment)
    if pool.role == "prefill":
        return prefill_capacity(pool, model, isl, ttft_s, q, tune, corr, typical, spread, servers)
    if pool.role == "decode":
        return decode_capacity(pool, model, isl, osl, itl_s, tune, corr)
    return mixed_capacity(pool, model, isl, osl, ttft_s, itl_s, q, tune, corr, typical, spread, servers)


def predicted_ttft(
    pool: PoolTarget,
    model: ModelArch,
    isl: float,
    rate_per_replica: float,
    spread: Spread = (),
    servers: int = 1,
) -> float | None:
    """Model mean TTFT (corr = 1) of a prefill or mixed replica at ``rate_per_replica``, one
    of ``servers`` behind the router (M/M/c mean wait C S / (c (1 - rho))), averaged over
    ``spread``'s prompt lengths (default: at the mean); ``None`` when the model says the
    replica is saturated. The engine's own TTFT, as vLLM reports it: its first token at
    the end of the prefill (a prefill instance's comes before the KV hand-off)."""
    prof = profile(pool.accelerator, model, pool.tp)
    length = max(1, round(isl))
    budget = pool.max_batch_tokens or DEFAULT_BUDGET["prefill" if pool.role == "prefill" else "mixed"]
    per_req_s, single_s = work_seconds(prof, length, budget, spread)
    rho = rate_per_replica * per_req_s
    if rho >= 0.95:
        return None
    c = max(1, servers)
    return single_s + erlang_c(c, c * rho) / (c * (1 - rho)) * per_req_s


def predicted_itl(pool: PoolTarget, model: ModelArch, isl: float, osl: float, batch: float) -> float:
    """Model decode step time (corr = 1) of a replica running ``batch`` sequences."""
    prof = profile(pool.accelerator, model, pool.tp)
    b = max(1, math.ceil(batch))
    return prof.decode_step(b, int(b * (isl + max(1.0, osl) / 2)))


def prefill_seconds_per_token(pool: PoolTarget, model: ModelArch, isl: float, spread: Spread = ()) -> float:
    """Model prefill time per prompt token of a replica at its batching budget (corr = 1),
    averaged over ``spread``'s prompt lengths (default: at the mean)."""
    prof = profile(pool.accelerator, model, pool.tp)
    length = max(1, round(isl))
    budget = pool.max_batch_tokens or DEFAULT_BUDGET["prefill" if pool.role == "prefill" else "mixed"]
    return work_seconds(prof, length, budget, spread)[0] / length


# The longest prompt `longest_prompt_within` considers (vLLM's largest common max_model_len, 128Ki).
LONGEST_PROMPT = 131072


@lru_cache(maxsize=512)
def longest_prompt_within(pool: PoolTarget, model: ModelArch, ttft_s: float, corr: float = 1.0) -> int:
    """The longest prompt whose first token an idle replica of ``pool`` (prefill or mixed)
    delivers within ``ttft_s``: the prompt alone, chunked at the pool's budget, times
    ``corr``; on the split path plus the KV hand-off and the decode replica's first step.
    0 when not even a one-token prompt makes it. Longer prompts miss the target on this
    pool whatever the fleet: no replica added makes them meet it."""
    prof = profile(pool.accelerator, model, pool.tp)
    budget = pool.max_batch_tokens or DEFAULT_BUDGET["prefill" if pool.role == "prefill" else "mixed"]

    def first_token_s(length: int) -> float:
        alone = prompt_seconds(prof, length, budget)[1] * corr
        return split_first_token_s(prof, model, pool, length, alone) if pool.role == "prefill" else alone

    if first_token_s(1) > ttft_s:
        return 0
    if first_token_s(LONGEST_PROMPT) <= ttft_s:
        return LONGEST_PROMPT
    lo, hi = 1, LONGEST_PROMPT  # first_token_s(lo) <= ttft_s < first_token_s(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if first_token_s(mid) <= ttft_s:
            lo = mid
        else:
            hi = mid
    return lo
