"""Prompt-length distribution of the demand, for choosing the split threshold.

The split threshold divides the requests by prompt length; to price a threshold the planner
needs how much demand (and of which mean length) falls on each side of it. vLLM exports
the prompt lengths as a histogram (``vllm:request_prompt_tokens_bucket``, 1-2-5 buckets up
to the model's context length); ``sum by (le) (rate(...))`` gives cumulative requests/s per
upper bound, which is what :attr:`PoolObservation.prompt_tokens_buckets` carries. Without
it the planner assumes a log-normal distribution with the observed mean (LLM prompt lengths
are roughly log-normal; the Azure 2023 traces fit sigma ~ 0.8-1.2).

Within a bucket lengths are taken as log-uniform, so fractions and partial means have a
closed form; conditional means are rescaled so the distribution's mean matches the
observed mean (the buckets are coarse).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# vLLM's build_1_2_5_buckets up to 200k tokens (the simulator uses the same bounds).
BUCKETS: tuple[float, ...] = (*(float(m * 10**e) for e in range(5) for m in (1, 2, 5)), 1e5, 2e5)
DEFAULT_SIGMA = 1.0
TOP = 1e9  # stands for the +Inf bucket where infinity cannot be stored (JSON)
Spread = tuple[tuple[float, float], ...]  # (prompt length, probability) pairs


@dataclass(frozen=True)
class LengthDist:
    """Probability mass of prompt lengths per bucket ``(lo, hi]`` (log-uniform inside)."""

    lows: tuple[float, ...]
    highs: tuple[float, ...]
    mass: tuple[float, ...]  # sums to 1
    scale: float = 1.0  # multiplies conditional means (matches the observed mean)

    def _split(self, threshold: float) -> tuple[float, float, float, float]:
        """(mass below, length-mass below, mass at/above, length-mass at/above) of ``threshold``."""
        below = below_len = above = above_len = 0.0
        for lo, hi, m in zip(self.lows, self.highs, self.mass, strict=True):
            if m <= 0:
                continue
            width = math.log(hi / lo)
            mean_len = (hi - lo) / width  # mean of a log-uniform on (lo, hi]
            if threshold <= lo:
                above += m
                above_len += m * mean_len
            elif threshold > hi:
                below += m
                below_len += m * mean_len
            else:
                f_above = math.log(hi / threshold) / width
                above += m * f_above
                above_len += m * (hi - threshold) / width
                below += m * (1 - f_above)
                below_len += m * (threshold - lo) / width
        return below, below_len, above, above_len

    def mean(self) -> float:
        below, below_len, above, above_len = self._split(0.0)
        total = below + above
        return self.scale * (below_len + above_len) / total if total > 0 else 0.0

    def median(self, low: float = 0.0, high: float = math.inf) -> float | None:
        """Median length of the prompts in ``[low, high)`` (scaled like the means)."""
        parts: list[tuple[float, float, float]] = []  # (lo, hi, mass) clipped to the range
        for lo, hi, m in zip(self.lows, self.highs, self.mass, strict=True):
            a, b = max(lo, low), min(hi, high)
            if m <= 0 or b <= a:
                continue
            parts.append((a, b, m * math.log(b / a) / math.log(hi / lo)))
        total = sum(m for _, _, m in parts)
        if total <= 0:
            return None
        half = total / 2.0
        for a, b, m in parts:
            if m >= half:
                return float(self.scale * a * (b / a) ** (half / m))
            half -= m
        return self.scale * parts[-1][1]

    def points(self, low: float = 0.0, high: float = math.inf, per_bucket: int = 2) -> Spread:
        """The distribution restricted to ``[low, high)`` as (length, weight) pairs whose
        weights sum to 1: each bucket cut into ``per_bucket`` sub-ranges of equal log width
        (equal mass, the bucket being log-uniform), each stood for by its mean length, scaled
        like the means. Prefill time is convex in the prompt length (attention is quadratic),
        so the work of a class is the mean of the time over these points, not the time of
        the mean length (Jensen's inequality); empty when the range holds no mass."""
        out: list[tuple[float, float]] = []
        for lo, hi, m in zip(self.lows, self.highs, self.mass, strict=True):
            a, b = max(lo, low), min(hi, high)
            if m <= 0 or b <= a:
                continue
            mass = m * math.log(b / a) / math.log(hi / lo)
            step = (b / a) ** (1.0 / per_bucket)
            for k in range(per_bucket):
                x, y = a * step**k, a * step ** (k + 1)
                out.append((self.scale * (y - x) / math.log(y / x), mass / per_bucket))
        total = sum(w for _, w in out)
        if total <= 0:
            return ()
        return tuple((length, w / total) for length, w in out if w > 0)

    def share(self, threshold: float) -> tuple[float, float | None, float | None]:
        """(fraction of requests with prompt >= threshold, their mean length, the others' mean)."""
        below, below_len, above, above_len = self._split(threshold)
        total = below + above
        if total <= 0:
            return 0.0, None, None
        mean_above = self.scale * above_len / above if above > 1e-12 else None
        mean_below = self.scale * below_len / below if below > 1e-12 else None
        return above / total, mean_above, mean_below


def from_buckets(cumulative: Iterable[tuple[float, float]], mean: float | None) -> LengthDist | None:
    """A distribution from Prometheus-style cumulative ``(le, count)`` pairs (any unit of
    count); ``None`` when there are no counts."""
    pairs = sorted((le, c) for le, c in cumulative if c is not None and math.isfinite(c) and c >= 0)
    lows: list[float] = []
    highs: list[float] = []
    mass: list[float] = []
    prev_le, prev_c = 0.5, 0.0
    for le, c in pairs:
        hi = le if math.isfinite(le) and le < TOP else max(2.0 * prev_le, 1.0)
        m = max(0.0, c - prev_c)
        if hi > prev_le:
            lows.append(prev_le)
            highs.append(hi)
            mass.append(m)
        prev_le, prev_c = hi, max(prev_c, c)
    total = sum(mass)
    if total <= 0:
        return None
    dist = LengthDist(tuple(lows), tuple(highs), tuple(m / total for m in mass))
    return _rescaled(dist, mean)


def lognormal(mean: float, sigma: float = DEFAULT_SIGMA) -> LengthDist:
    """A log-normal of the given mean, discretised on :data:`BUCKETS`."""
    mu = math.log(max(1.0, mean)) - sigma * sigma / 2.0

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2.0))))

    lows: list[float] = []
    highs: list[float] = []
    mass: list[float] = []
    prev = 0.5
    for hi in BUCKETS:
        lows.append(prev)
        highs.append(hi)
        mass.append(max(0.0, cdf(hi) - (cdf(prev) if prev > 0.5 else 0.0)))
        prev = hi
    total = sum(mass)
    dist = LengthDist(tuple(lows), tuple(highs), tuple(m / total for m in mass))
    return _rescaled(dist, mean)


def _rescaled(dist: LengthDist, mean: float | None) -> LengthDist:
    raw = dist.mean()
    if mean is None or mean <= 0 or raw <= 0:
        return dist
    return LengthDist(dist.lows, dist.highs, dist.mass, min(2.0, max(0.5, mean / raw)))


def merge(histograms: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Sum cumulative histograms of several pools (same or different bounds)."""
    bounds = sorted({le for h in histograms for le, _ in h})
    out: list[tuple[float, float]] = []
    for le in bounds:
        total = 0.0
        for h in histograms:
            below = [c for b, c in h if b <= le]
            total += max(below) if below else 0.0
        out.append((le, total))
    return out
