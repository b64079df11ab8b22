"""Synthetic traces for the planner benchmark (deterministic in their seed).

Arrivals are a non-homogeneous Poisson process (Lewis-Shedler thinning) with log-normal
prompt and output lengths, like :func:`tandem.sim.trace.synthetic`. Shapes:

* ``shift``: short chat (mean 1,000 prompt / 250 output tokens, the Azure 2023 conversation
  trace's order, perf-anchors §9) turning into long-context code (6,000 / 60) halfway.
* ``diurnal``: a day compressed into an hour, 0.5 -> 4 -> 0.5 req/s (cosine).
* ``bursts``: 1.5 req/s with three 90-second bursts at 4x.

A recorded trace has one realisation only; :func:`resample_blocks` draws others from it (a
block bootstrap: its own bursts, lengths and gaps, in another order) for held-out checks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from tandem.sim.trace import TraceRequest

Shape = Callable[[float], tuple[float, float, float]]  # t -> (rate, mean prompt, mean output)


def generate(
    shape: Shape, duration_s: float, peak_rate: float, seed: int, sigma: float = 0.8
) -> list[TraceRequest]:
    """Requests over ``[0, duration_s)`` whose rate at ``t`` is ``shape(t)[0]`` (<= ``peak_rate``)."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t = 0.0
    shift = sigma * sigma / 2.0
    while True:
        t += rng.expovariate(peak_rate)
        if t >= duration_s:
            return out
        rate, isl, osl = shape(t)
        if rng.random() * peak_rate > rate:
            continue
        p = min(16384, max(1, round(rng.lognormvariate(math.log(isl) - shift, sigma))))
        o = min(2048, max(1, round(rng.lognormvariate(math.log(osl) - shift, sigma))))
        out.append(TraceRequest(t, p, o))


def shift(seed: int = 1, duration_s: float = 2400.0) -> list[TraceRequest]:
    half = duration_s / 2
    return generate(
        lambda t: (3.0, 1000.0, 250.0) if t < half else (1.5, 6000.0, 60.0), duration_s, 3.0, seed
    )


def diurnal(seed: int = 2, duration_s: float = 3600.0) -> list[TraceRequest]:
    def shape(t: float) -> tuple[float, float, float]:
        return 0.5 + 3.5 * (1 - math.cos(2 * math.pi * t / duration_s)) / 2, 1500.0, 200.0

    return generate(shape, duration_s, 4.0, seed)


def bursts(seed: int = 3, duration_s: float = 2400.0) -> list[TraceRequest]:
    starts = (480.0, 1080.0, 1680.0)

    def shape(t: float) -> tuple[float, float, float]:
        burst = any(s <= t < s + 90.0 for s in starts)
        return (6.0 if burst else 1.5), 1200.0, 150.0

    return generate(shape, duration_s, 6.0, seed)


def resample_blocks(trace: Sequence[TraceRequest], block_s: float, seed: int) -> list[TraceRequest]:
    """As many ``block_s``-second blocks as ``trace`` spans, each a block of ``trace`` drawn
    with replacement (deterministic in ``seed``), requests keeping their offsets in the block."""
    if block_s <= 0:
        raise ValueError(f"block length must be positive, got {block_s}")
    if not trace:
        return []
    count = int(max(r.arrival for r in trace) // block_s) + 1
    blocks: list[list[TraceRequest]] = [[] for _ in range(count)]
    for r in trace:
        blocks[int(r.arrival // block_s)].append(r)
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    for i in range(count):
        drawn = rng.randrange(count)
        out += [r._replace(arrival=r.arrival + (i - drawn) * block_s) for r in blocks[drawn]]
    return sorted(out, key=lambda r: r.arrival)


SYNTHETIC: dict[str, Callable[..., list[TraceRequest]]] = {  # each takes seed=, duration_s=
    "synthetic-shift": shift,
    "synthetic-diurnal": diurnal,
    "synthetic-bursts": bursts,
}
