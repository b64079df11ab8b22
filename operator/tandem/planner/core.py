"""Tandem's planner: a pure function from (spec, observation, state, now) to a decision.

Per interval:

1. **Check the data.** A pool that has ready replicas but no reading, an incomplete
   reading, a stale scrape, or an implausible number (NaN, infinity, a negative rate, KV
   usage above 1) stops the planner: it holds every pool (only the spec's min/max bounds
   still apply) and says why. Missing data is never read as zero load.
2. **Demand per class.** Requests at least ``split_threshold`` tokens long take the split
   path (prefill pools -> decode pools), shorter ones the mixed pools. Each class has a
   request rate (plus the backlog of waiting requests, to be drained within the lead time),
   a mean prompt (ISL) and output (OSL) length. Rates and prompt lengths are the router's
   count of the arrivals when it is scraped and sees the traffic (its lengths scaled to the
   engines' exact counts), else the entry engines' count of finished requests (`observe_total`).
3. **Forecast** each class's rate over the next interval plus the replica lead time
   (:mod:`tandem.planner.forecast`); size for max(forecast, now): fast up. While the SLO's
   error budget is spent and arrivals are bursty (seconds-long bursts are over before a
   replica started for them serves), size for at least `burst_floor`.
4. **Correct the model online**: per pool, the ratio of observed to modelled latency at the
   observed per-replica load (Dynamo's correction factors, perf-anchors §3.3), smoothed and
   clamped, multiplies the model's times.
5. **Size** every role from :mod:`tandem.planner.capacity`: capacity per replica of the
   class's shape at the SLO, filled cheapest-per-request first (a pool that cannot meet the
   SLO is not used); mins first, maxes respected. Replicas that run are preferred within
   ``pool_hysteresis``: on the way down the cheapest fleet among them, on the way up the
   cheapest fleet that keeps them all.
6. **Tune the split threshold**: move it by one step towards the path that serves a
   request of the threshold's length more cheaply, and down whenever the mixed pools miss
   the ITL target.
7. **Stabilise**, per role: up at once; down only to the cheapest of the running replicas
   that hold the most capacity one decision recommended for the role within the last
   ``down_window_s`` (HPA's scale-down stabilisation, counted for the role at today's
   capacity per replica rather than per pool, so that a burst sized on one pool and a lull
   sized on another do not hold both; halved while most of the error budget is unspent and
   demand has not fallen far below the window's peak, see `down_window`);
   while the SLO's error budget is spent (first tokens beyond the TTFT target, except those
   of prompts no pool can prefill in time, above 1 - the attainment target over
   ``slo_window_s``: `budget_spent`), every pool keeps its own highest
   recommendation of the window instead. Sizing prefers the replicas that run over a fleet
   on other pools costing less than ``pool_hysteresis`` less. No change to a pool while its
   previous scale-up is still starting, and no scale-down of a role while any of its pools
   is starting or going up (the new capacity is not serving yet), unless the budget stopped
   that scale-up.
8. **Budget**: remove the most expensive replicas until devices and cost per hour fit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from tandem.planner import forecast, lengths
from tandem.planner.capacity import (
    LONGEST_PROMPT,
    Capacity,
    capacity,
    longest_prompt_within,
    predicted_itl,
    predicted_ttft,
    prefill_seconds_per_token,
)
from tandem.planner.lengths import LengthDist
from tandem.planner.types import (
    Decision,
    LimitedBy,
    Observation,
    PlannerSpec,
    PlannerState,
    PoolObservation,
    PoolReading,
    PoolTarget,
    Role,
    Trend,
)

# Used until a length has been observed: the Azure LLM 2023 traces' means are 1,155-2,048
# prompt and 28-211 output tokens (perf-anchors §9).
DEFAULT_ISL = 1024.0
DEFAULT_OSL = 128.0
MIN_SAMPLES = 5.0  # requests per interval before a latency feeds the correction
UNREACHABLE_NOTE = 0.01  # the decision's message names unreachable prompts from this share on
UNMET_PENALTY = 1e4  # USD/hour per request/s a plan cannot serve (when choosing a threshold)
MIN_RATE = 1e-3  # requests/s below which a class needs no replicas (one per ~17 minutes)


@dataclass(frozen=True)
class DemandClass:
    name: str  # "split" or "mixed"
    roles: tuple[Role, ...]  # roles that serve it, in request order
    entry: Role
    exit: Role


@dataclass(frozen=True)
class Demand:
    rate: float  # requests/s to plan for
    observed: float  # requests/s now (entry rate + backlog)
    isl: float  # mean prompt tokens (sets the work)
    osl: float
    typical: float | None = None  # median prompt tokens (sets the latency the target is met at)
    spread: lengths.Spread = ()  # the prompt lengths (the prefill work is averaged over them)


@dataclass
class _Plan:
    """Working data of one decision (not kept)."""

    targets: dict[str, int | None] = field(default_factory=dict)
    caps: dict[str, Capacity] = field(default_factory=dict)
    limited: LimitedBy | None = None
    limited_pools: list[str] = field(default_factory=list)  # pools at their max that fall short
    infeasible: list[str] = field(default_factory=list)
    unmet: float = 0.0  # requests/s no allowed fleet serves within the SLO (per role)
    held: dict[str, str] = field(default_factory=dict)  # pool -> why it was held
    running: Mapping[str, int] = field(default_factory=dict)  # pool -> replicas in force now
    unused: set[Role] = field(default_factory=set)  # roles no class of the plan sends demand to
    above_need: set[str] = field(default_factory=set)  # pools of roles whose mins add unneeded replicas


def classes(spec: PlannerSpec) -> list[DemandClass]:
    """The request paths the spec's pools provide."""
    return list(_classes(frozenset(p.role for p in spec.pools)))


@lru_cache(maxsize=16)
def _classes(roles: frozenset[Role]) -> tuple[DemandClass, ...]:
    out: list[DemandClass] = []
    if "prefill" in roles:
        out.append(DemandClass("split", ("prefill", "decode"), "prefill", "decode"))
    elif "decode" in roles and "mixed" not in roles:
        out.append(DemandClass("split", ("decode",), "decode", "decode"))
    if "mixed" in roles:
        out.append(DemandClass("mixed", ("mixed",), "mixed", "mixed"))
    return tuple(out)


# ------------------------------------------------------------------------- 1. data checks


def _implausible(name: str, reading: PoolReading) -> str | None:
    if min(reading.replicas, reading.ready, reading.starting) < 0:
        return f"pool {name} reports negative replica counts"
    for key, value in reading.metrics.numbers().items():
        if value is None:
            continue
        if not math.isfinite(value) or value < 0:
            return f"pool {name} reports {key}={value}"
    kv = reading.metrics.kv_usage
    if kv is not None and kv > 1.05:
        return f"pool {name} reports KV usage {kv:.2f} (> 1)"
    return None


def check(spec: PlannerSpec, obs: Observation) -> tuple[str, str] | None:
    """(reason, message) when the observation cannot be trusted, else None."""
    max_age = spec.tuning.max_scrape_age_intervals * spec.interval_s
    for pool in spec.pools:
        reading = obs.pools.get(pool.name)
        if reading is None:
            return "MetricsMissing", f"No reading for pool {pool.name}."
        bad = _implausible(pool.name, reading)
        if bad is not None:
            return "MetricsImplausible", f"Held all pools: {bad}."
        if reading.ready == 0:
            continue  # no replica serves: no data is expected
        m = reading.metrics
        if not m.complete or m.waiting is None or m.requests_per_s is None:
            return "MetricsMissing", f"Held all pools: no metrics for pool {pool.name}."
        if m.scrape_age_s is not None and m.scrape_age_s > max_age:
            return (
                "ScrapeGap",
                f"Held all pools: pool {pool.name} was last scraped {m.scrape_age_s:.0f} s ago.",
            )
    return None


# ------------------------------------------------------------------------- 2-3. demand


def _weighted(pairs: list[tuple[float | None, float]]) -> float | None:
    usable = [(v, w) for v, w in pairs if v is not None and w > 0]
    total = sum(w for _, w in usable)
    if total <= 0:
        known = [v for v, _ in pairs if v is not None and v > 0]
        return sum(known) / len(known) if known else None
    return sum(v * w for v, w in usable) / total


def _readings(spec: PlannerSpec, obs: Observation, role: Role) -> list[PoolReading]:
    return [obs.pools[p.name] for p in spec.by_role(role) if obs.pools[p.name].ready > 0]


@dataclass(frozen=True)
class Total:
    """All requests entering the service, whatever path they take."""

    rate: float  # requests/s to plan for (forecast, fast up)
    observed: float  # requests/s now (entry rate + backlog)
    lengths: LengthDist  # prompt lengths
    osl: float
    source: str = "pools"  # whose count of the arrivals: "router" or "pools" (`observe_total`)


def _entry_roles(spec: PlannerSpec) -> tuple[Role, ...]:
    return tuple(dict.fromkeys(c.entry for c in classes(spec)))


def router_arrivals(obs: Observation) -> PoolObservation | None:
    """The router's arrival reading (`Observation.arrivals`) when it is usable: a finite,
    non-negative rate, and a mean prompt whenever requests arrived; else None (the engines'
    readings stand in)."""
    a = obs.arrivals
    if a is None or not a.complete:
        return None
    rate, mean = a.requests_per_s, a.mean_prompt_tokens
    if rate is None or not math.isfinite(rate) or rate < 0:
        return None
    if rate > 0 and (mean is None or not math.isfinite(mean) or mean <= 0):
        return None
    return a


@dataclass(frozen=True)
class Entering:
    """What one observation says enters the service (`observe_total`)."""

    rate: float  # requests/s, plus the backlog to drain within the lead time
    isl: float | None  # mean prompt tokens (None: no request seen)
    osl: float | None  # mean output tokens of the exit pools' finished requests
    hists: list[Any]  # cumulative prompt-length histograms to merge
    source: str  # "router" or "pools"
    # the engines' own finished requests/s and mean prompt (the router's calibration)
    engines_rate: float = 0.0
    engines_isl: float | None = None
    sampled: float = 0.0  # requests/s whose prompts the mean ``isl`` is over


def _scaled_buckets(
    buckets: tuple[tuple[float, float], ...], scale: float
) -> tuple[tuple[float, float], ...]:
    return tuple((le * scale if math.isfinite(le) else le, c) for le, c in buckets)


def observe_total(
    spec: PlannerSpec, obs: Observation, scale: float = 1.0, bypassed: bool = False
) -> Entering:
    """The demand entering now. The router's arrivals (`router_arrivals`) when it is scraped
    and sees the traffic: an engine counts a request only when it finishes, which trails a
    burst by its queue. The entry pools' finished requests when the router is not scraped or
    is ``bypassed`` (`router_bypassed`). The router counts prompt tokens by its estimate
    unless it has the tokenizer: ``scale`` (`prompt_scale`) maps its lengths to the engines'
    exact counts. Output lengths are the exit pools' either way (known at the end)."""
    entry = [r for role in _entry_roles(spec) for r in _readings(spec, obs, role)]
    exit_roles = tuple(dict.fromkeys(c.exit for c in classes(spec)))
    exits = [r for role in exit_roles for r in _readings(spec, obs, role)]
    waiting = sum(r.metrics.waiting or 0.0 for r in {id(r): r for r in entry + exits}.values())
    backlog = waiting / (spec.interval_s + spec.tuning.lead_time_s)
    osl = _weighted(
        [
            (
                r.metrics.mean_output_tokens,
                (r.metrics.generation_tokens_per_s or 0.0) / r.metrics.mean_output_tokens,
            )
            if r.metrics.mean_output_tokens
            else (None, 0.0)
            for r in exits
        ]
    )
    finished = sum(r.metrics.requests_per_s or 0.0 for r in entry)
    isl = _weighted([(r.metrics.mean_prompt_tokens, r.metrics.requests_per_s or 0.0) for r in entry])
    hists = [r.metrics.prompt_tokens_buckets for r in entry if r.metrics.prompt_tokens_buckets]
    arrivals = router_arrivals(obs)
    if arrivals is not None and not bypassed:
        arrived = arrivals.requests_per_s or 0.0
        mean = arrivals.mean_prompt_tokens
        return Entering(
            arrived + backlog,
            mean * scale if arrived > 0 and mean is not None else None,
            osl,
            [_scaled_buckets(b, scale)] if (b := arrivals.prompt_tokens_buckets) else [],
            "router",
            finished,
            isl,
            arrived,
        )
    return Entering(finished + backlog, isl, osl, hists, "pools", finished, isl, finished)


def _span(spec: PlannerSpec, st: PlannerState, now: float) -> tuple[float, float]:
    """(seconds this decision's rates stand for, the decay of ``slo_window_s`` over them):
    about one interval; a late decision does not stand for a longer span."""
    dt = spec.interval_s if st.last_time is None else min(2 * spec.interval_s, max(0.0, now - st.last_time))
    return dt, math.exp(-dt / max(1.0, spec.tuning.slo_window_s))


def update_prompt_counts(
    spec: PlannerSpec, obs: Observation, seen: Entering, st: PlannerState, now: float
) -> None:
    """Fold the interval (``seen``: `observe_total` unscaled) into ``st.prompt_counts``,
    decayed over ``slo_window_s``: the requests the router counted and the entry engines
    finished (``"seen"``), and, over the intervals where both report a mean prompt, their
    prompt tokens and requests (``"router"``, ``"engines"``). Both sides count the same
    requests over a window, the engines later."""
    arrivals = router_arrivals(obs)
    if arrivals is None:
        return
    dt, decay = _span(spec, st, now)
    counts = {
        k: [v * decay for v in st.prompt_counts.get(k, [0.0, 0.0])] for k in ("seen", "router", "engines")
    }
    arrived = arrivals.requests_per_s or 0.0
    counts["seen"][0] += arrived * dt
    counts["seen"][1] += seen.engines_rate * dt
    if seen.isl is not None and seen.engines_isl is not None:
        counts["router"][0] += arrived * seen.isl * dt
        counts["router"][1] += arrived * dt
        counts["engines"][0] += seen.engines_rate * seen.engines_isl * dt
        counts["engines"][1] += seen.engines_rate * dt
    st.prompt_counts = counts


def router_bypassed(spec: PlannerSpec, st: PlannerState) -> bool:
    """Whether, over ``slo_window_s``, the router counted fewer than ``router_min_share`` of
    the requests the entry engines finished (once they finished ``slo_min_requests``): traffic
    bypasses it, say a Gateway API inference gateway routing straight to the pods, and its
    count is not the demand. Over a window, not per interval: after a burst the engines
    finish its queue while few arrive, and flipping to their lagging counts then cost
    synthetic-shift 1.7x -> 2.5x the oracle's cost."""
    arrived, finished = st.prompt_counts.get("seen", [0.0, 0.0])
    t = spec.tuning
    return finished >= t.slo_min_requests and arrived < t.router_min_share * finished


def prompt_scale(spec: PlannerSpec, st: PlannerState) -> float:
    """The engines' mean prompt / the router's over ``slo_window_s`` (`update_prompt_counts`),
    within [1/``router_scale_max``, ``router_scale_max``]; 1 until each side counted
    ``slo_min_requests`` requests, and while the two agree within ``router_scale_deadband``.
    The router estimates tokens from bytes unless it has the model's tokenizer (~4 bytes per
    token of English prose, fewer for code)."""
    t = spec.tuning
    (r_tokens, r_n), (e_tokens, e_n) = (st.prompt_counts.get(k, [0.0, 0.0]) for k in ("router", "engines"))
    if min(r_n, e_n) < t.slo_min_requests or r_tokens <= 0 or e_tokens <= 0:
        return 1.0
    scale = (e_tokens / e_n) / (r_tokens / r_n)
    if abs(math.log(scale)) < math.log1p(t.router_scale_deadband):
        return 1.0  # counting noise (the two sides count a window's requests at different times)
    return min(t.router_scale_max, max(1.0 / t.router_scale_max, scale))


def plan_total(spec: PlannerSpec, obs: Observation, st: PlannerState, now: float) -> Total:
    """Observed demand folded into the forecasts (updates ``st.forecast``)."""
    horizon = spec.interval_s + spec.tuning.lead_time_s
    update_prompt_counts(spec, obs, observe_total(spec, obs), st, now)
    entering = observe_total(spec, obs, prompt_scale(spec, st), router_bypassed(spec, st))
    rate, isl, osl, hists = entering.rate, entering.isl, entering.osl, entering.hists
    st.forecast["total"] = forecast.update(st.forecast.get("total"), rate, now, spec.interval_s)
    means: list[float] = []
    for key, value, default in (("isl", isl, DEFAULT_ISL), ("osl", osl, DEFAULT_OSL)):
        name = f"total.{key}"
        if value is not None and value > 0:
            before = st.forecast.get(name)
            level = before.level if before is not None else None
            few = spec.tuning.isl_min_requests
            sampled = entering.sampled * spec.interval_s
            if key == "isl" and before is not None and level is not None and sampled < few:
                # a mean over a handful of prompts is mostly noise: it moves the level in
                # proportion to its count, and neither restarts nor re-times the series
                weight = forecast.ALPHA * sampled / few
                st.forecast[name] = replace(before, level=level + weight * (value - level))
            elif key == "isl" and level is not None and value > level * (1.0 + spec.tuning.isl_jump):
                # the workload changed, not the noise: the smoothing restarts at the new mean
                st.forecast[name] = Trend(level=value, trend=0.0, updated=now)
            else:
                st.forecast[name] = forecast.update(before, value, now, spec.interval_s)
        known = st.forecast.get(name)
        means.append(known.level if known is not None and known.level is not None else default)
    if hists:  # remember the shape (normalised; JSON has no infinity) for intervals without data
        merged = lengths.merge(hists)
        top = max(c for _, c in merged)
        if top > 0:
            seen = [(min(le, lengths.TOP), c / top) for le, c in merged]
            old = dict(st.prompt_lengths)
            st.prompt_lengths = [(le, 0.5 * c + 0.5 * old.get(le, c)) for le, c in seen]
    dist = lengths.from_buckets(st.prompt_lengths, means[0]) if st.prompt_lengths else None
    if dist is None:
        dist = lengths.lognormal(means[0])
    predicted = forecast.predict(st.forecast["total"], horizon, spec.interval_s) or 0.0
    if bursty(spec, st):
        # A burst's rise is no ramp: the trend would plan for a burst larger than any of the
        # hour, on replicas that start after it ended. With bursty arrivals the forecast goes
        # no higher than the highest rate of the burst memory (today's rate still counts).
        # synthetic-bursts: oracle ratio 1.755 -> 1.513 (attainment 0.9745 -> 0.9732); its
        # development seeds 31-40: geomean 1.89 -> 1.59; Azure code 1.392 -> 1.384 (0.9148 ->
        # 0.9074); shift and diurnal unchanged (not that bursty).
        predicted = min(predicted, max(r for _, r in st.arrivals))
    return Total(max(rate, predicted), rate, dist, max(1.0, means[1]), entering.source)


def dispersion(spec: PlannerSpec, st: PlannerState) -> float | None:
    """The arrivals' index of dispersion over the memory (variance / mean of the counts per
    interval, the variance from successive differences so that a slow ramp does not count;
    Poisson: 1); None until ``burst_min_intervals`` intervals were watched (or as many as the
    memory holds, at long intervals) or while nothing arrived."""
    memory = int(spec.tuning.burst_memory_s // max(spec.interval_s, 1e-9))  # entries it can hold
    if len(st.arrivals) < max(3, min(spec.tuning.burst_min_intervals, memory)):
        return None
    counts = [r * spec.interval_s for _, r in st.arrivals]
    mean = sum(counts) / len(counts)
    if mean <= 0:
        return None
    return sum((b - a) ** 2 for a, b in itertools.pairwise(counts)) / (2 * (len(counts) - 1)) / mean


def bursty(spec: PlannerSpec, st: PlannerState) -> bool:
    """Whether the arrivals' `dispersion` is known and at least ``burst_dispersion``."""
    index = dispersion(spec, st)
    return index is not None and index >= spec.tuning.burst_dispersion


def burst_floor(spec: PlannerSpec, st: PlannerState, rate: float, now: float) -> float:
    """The rate the fleet keeps for bursty arrivals (updates ``st.arrivals``); 0 for smooth ones.

    A burst of seconds is over before a replica started for it serves (minutes), so only
    capacity that already runs can serve it. When the arrivals' `dispersion` is at least
    ``burst_dispersion``, this is the least rate R with sum(max(0, r_i - R)) <= share *
    sum(r_i) over the memory: at most ``burst_excess_share`` of the error budget arrives
    beyond R. 0 once no request came for ``spare_window_share`` of the scale-down window (the
    load stopped: longer than any gap between the Azure code trace's bursts, 217 s), so the
    fleet then goes down."""
    t = spec.tuning
    st.arrivals = [(ts, r) for ts, r in st.arrivals if now - ts < t.burst_memory_s] + [(now, rate)]
    if not bursty(spec, st):
        return 0.0
    silence = t.down_window_s * t.spare_window_share
    if all(r <= 0 for ts, r in st.arrivals if now - ts < silence):
        return 0.0
    rates = [r for _, r in st.arrivals]
    allowed = t.burst_excess_share * (1 - spec.attainment) * sum(rates)
    low, high = 0.0, max(rates)
    for _ in range(40):
        mid = (low + high) / 2
        if sum(max(0.0, r - mid) for r in rates) <= allowed:
            high = mid
        else:
            low = mid
    return high


def held_total(spec: PlannerSpec, total: Total, st: PlannerState, now: float) -> Total:
    """The demand the fleet is held for: the highest planned rate of the scale-down window
    (updates ``st.demand``). Choosing the threshold and routing by it, not by the last
    interval, keeps a lull between bursts from re-planning the fleet."""
    full = spec.tuning.down_window_s
    st.demand = [(t, r) for t, r in st.demand if now - t < full] + [(now, total.rate)]
    window = down_window(spec, st, now)
    held = max(r for t, r in st.demand if _in_window(t, now, window))
    return Total(held, held, total.lengths, total.osl, total.source)


def class_demand(spec: PlannerSpec, total: Total, threshold: int) -> dict[str, Demand]:
    """Demand per class when prompts of at least ``threshold`` tokens take the split path."""
    names = [c.name for c in classes(spec)]
    mean = _mean(total.lengths) or DEFAULT_ISL
    if len(names) < 2:
        spread = _points(total.lengths, 0, None)
        return {n: Demand(total.rate, total.observed, mean, total.osl, spread=spread) for n in names}
    frac, above, below, median_above, median_below = _shares(total.lengths, threshold)
    return {
        "split": Demand(
            total.rate * frac,
            total.observed * frac,
            above or max(mean, threshold),
            total.osl,
            median_above,
            _points(total.lengths, threshold, None) if above else (),
        ),
        "mixed": Demand(
            total.rate * (1 - frac),
            total.observed * (1 - frac),
            below or min(mean, threshold),
            total.osl,
            median_below,
            _points(total.lengths, 0, threshold) if below else (),
        ),
    }


# A decision splits one distribution at each candidate threshold several times (sizing,
# routing, the final plan); the distribution is a frozen value, so the results are memoised.
@lru_cache(maxsize=256)
def _mean(dist: LengthDist) -> float:
    return dist.mean()


@lru_cache(maxsize=2048)
def _points(dist: LengthDist, low: int, high: int | None) -> lengths.Spread:
    return dist.points(low, math.inf if high is None else high)


@lru_cache(maxsize=2048)
def _shares(
    dist: LengthDist, threshold: int
) -> tuple[float, float | None, float | None, float | None, float | None]:
    """``dist.share(threshold)`` and the medians above and below ``threshold``."""
    frac, above, below = dist.share(threshold)
    return frac, above, below, dist.median(low=threshold), dist.median(high=threshold)


# ------------------------------------------------------------------------- 4. correction


def _ratio(
    spec: PlannerSpec, st: PlannerState, pool: PoolTarget, reading: PoolReading, demand: Demand
) -> float | None:
    """Observed / modelled latency of one pool, or None when the sample is not informative."""
    m = reading.metrics
    # the offered load: what the router sent the pool, when it is scraped; the engine's own
    # count of finished requests trails it while a queue builds (a burst read as a slow model)
    offered = m.routed_per_s if m.routed_per_s is not None else m.requests_per_s
    per_replica = (offered or 0.0) / reading.ready
    backlog = (m.waiting or 0.0) / reading.ready
    if backlog > 2:
        return None  # a queue measures the backlog, not the model
    if pool.role == "prefill":
        if m.mean_ttft_s is None or per_replica * spec.interval_s < MIN_SAMPLES:
            return None
        pred = predicted_ttft(
            pool, spec.model, demand.isl, per_replica, demand.spread, _servers(spec, st, reading.ready)
        )
        return m.mean_ttft_s / pred if pred else None
    if m.mean_itl_s is None or not m.running:
        return None
    pred_itl = predicted_itl(pool, spec.model, demand.isl, demand.osl, m.running / reading.ready)
    if pool.role == "mixed":
        rho_p = (
            (m.prompt_tokens_per_s or 0.0)
            / reading.ready
            * prefill_seconds_per_token(pool, spec.model, demand.isl, demand.spread)
        )
        pred_itl /= max(0.05, 1 - min(0.95, rho_p))
    return m.mean_itl_s / pred_itl if pred_itl > 0 else None


def update_corrections(
    spec: PlannerSpec, obs: Observation, st: PlannerState, demand: Mapping[str, Demand]
) -> None:
    t = spec.tuning
    capped = bursty(spec, st)
    for cls in classes(spec):
        d = demand[cls.name]
        for role in cls.roles:
            for pool in spec.by_role(role):
                reading = obs.pools[pool.name]
                if reading.ready == 0:
                    continue
                ratio = _ratio(spec, st, pool, reading, d)
                if ratio is None or not math.isfinite(ratio):
                    continue
                m = reading.metrics
                seen, target = (
                    (m.mean_ttft_s, spec.ttft_s) if pool.role == "prefill" else (m.mean_itl_s, spec.itl_s)
                )
                if seen is not None and seen < t.correction_floor * target:
                    # far inside the SLO the model's error costs nothing: a sample there may
                    # say the model is pessimistic, never that capacity must shrink
                    ratio = min(ratio, 1.0)
                if capped and pool.role != "decode":
                    # the queue of a burst inside the interval, which the model (at the
                    # interval's mean rate) leaves out: the burst floor and the window hold
                    # capacity for it
                    ratio = min(ratio, t.burst_correction_max)
                ratio = min(t.correction_max, max(t.correction_min, ratio))
                old = st.correction.get(pool.name, 1.0)
                st.correction[pool.name] = (1 - t.correction_alpha) * old + t.correction_alpha * ratio


# ------------------------------------------------------------------------- 4b. error budget


def within(buckets: tuple[tuple[float, float], ...], target: float) -> tuple[float, float] | None:
    """(rate within ``target``, total rate) from cumulative histogram buckets (upper bound,
    cumulative rate), linear inside the bucket that holds the target (as
    ``histogram_quantile`` assumes); None without a total."""
    points: list[tuple[float, float]] = []
    for le, c in sorted((le, c) for le, c in buckets if math.isfinite(c)):
        # rate() extrapolates each bucket's series on its own: cumulative counts can dip
        points.append((le, max(c, points[-1][1]) if points else max(0.0, c)))
    if not points or points[-1][1] <= 0:
        return None
    total = points[-1][1]
    lo_le, lo_c = 0.0, 0.0
    for le, c in points:
        if le >= target:
            if not math.isfinite(le):
                return lo_c, total
            return lo_c + (target - lo_le) / (le - lo_le) * (c - lo_c), total
        lo_le, lo_c = le, c
    return total, total


def budget_source(spec: PlannerSpec, obs: Observation) -> tuple[str, tuple[float, float] | None]:
    """Whose first tokens the error budget counts, and (within the TTFT target, all) per
    second: the router's, as clients see them, when it reports any; else the entry pools'
    engines' (prefill, mixed: on the split path they miss the KV hand-off)."""
    if obs.client_ttft_buckets:
        got = within(obs.client_ttft_buckets, spec.ttft_s)
        if got is not None:
            return "router", got
    met = seen = 0.0
    found = False
    for role in _entry_roles(spec):
        for reading in _readings(spec, obs, role):
            buckets = reading.metrics.ttft_buckets
            one = within(buckets, spec.ttft_s) if buckets else None
            if one is not None:
                met, seen, found = met + one[0], seen + one[1], True
    return "pools", ((met, seen) if found else None)


def longest_reachable_prompt(spec: PlannerSpec, st: PlannerState) -> int:
    """The longest prompt some entry pool of the spec (mixed; prefill, when the spec has
    decode pools too) can deliver a first token for within the TTFT target, even alone
    (`longest_prompt_within`). Its correction counts only when it says the model is
    pessimistic: a correction above 1 mostly measures queueing, which an idle replica has
    not, and counting it would call prompts unreachable that more replicas would serve."""
    longest = 0
    for role in _entry_roles(spec):
        for pool in spec.by_role(role):
            if pool.max_replicas <= 0:
                continue
            corr = min(1.0, correction(spec, st, pool))
            longest = max(longest, longest_prompt_within(pool, spec.model, spec.ttft_s, round(corr, 3)))
    return longest


def unreachable_share(spec: PlannerSpec, st: PlannerState, dist: LengthDist) -> float:
    """The share of prompts of ``dist`` longer than `longest_reachable_prompt`: their first
    tokens miss the TTFT target on any fleet the spec allows."""
    longest = longest_reachable_prompt(spec, st)
    if longest >= LONGEST_PROMPT:
        return 0.0
    return dist.share(longest + 1)[0]


def update_budget(
    spec: PlannerSpec, obs: Observation, st: PlannerState, now: float, unreachable: float = 0.0
) -> str:
    """Fold the interval's first tokens within the TTFT target (`budget_source`) into the
    decayed counts ``st.slo_met`` / ``st.slo_seen``, and the ``unreachable`` share of them
    (`unreachable_share`) into ``st.slo_unreachable``; returns whose first tokens they were."""
    source, counts = budget_source(spec, obs)
    met, seen = counts or (0.0, 0.0)
    dt, decay = _span(spec, st, now)
    st.slo_met = st.slo_met * decay + met * dt
    st.slo_seen = st.slo_seen * decay + seen * dt
    # never more than the interval missed: prompts the model wrongly calls unreachable that
    # met the target do not excuse other misses
    st.slo_unreachable = st.slo_unreachable * decay + min(seen * unreachable, max(0.0, seen - met)) * dt
    return source


def down_window(spec: PlannerSpec, st: PlannerState, now: float) -> float:
    """The scale-down window in force: ``down_window_s``, cut to ``spare_window_share`` of it
    once the planner has watched a whole window, while at least ``spare_budget_share`` of the
    error budget is unspent (first tokens within the TTFT target over ``slo_window_s``, enough
    of them seen) and today's demand is at least ``spare_peak_share`` of the window's peak (a
    burst's fleet still waits for the next burst). Holding a
    burst's fleet for the long window buys attainment; with the budget mostly unspent it
    buys nothing (synthetic-bursts: 0.98 attainment while 3-4 mixed replicas sat out each
    window after a burst). Spending the budget lengthens the window again."""
    t = spec.tuning
    watched = any(
        not _in_window(at, now, t.down_window_s) for recs in st.recommendations.values() for at, _ in recs
    )
    if not watched or not st.demand:
        return t.down_window_s
    peak = max(r for _, r in st.demand)
    if budget_spare(spec, st) and st.demand[-1][1] >= t.spare_peak_share * peak:
        return t.down_window_s * t.spare_window_share
    return t.down_window_s


def met_share(spec: PlannerSpec, st: PlannerState) -> float | None:
    """The recent share of first tokens within the TTFT target (over ``slo_window_s``); None
    while too few were seen to tell."""
    if st.slo_seen <= 0 or st.slo_seen < spec.tuning.slo_min_requests:
        return None
    return st.slo_met / st.slo_seen


def avoidable_miss_share(spec: PlannerSpec, st: PlannerState) -> float | None:
    """The recent share of first tokens beyond the TTFT target that a larger fleet could
    have delivered in time: all misses but the unreachable prompts' (`unreachable_share`).
    None while too few were seen to tell."""
    met = met_share(spec, st)
    if met is None:
        return None
    return max(0.0, 1.0 - met - st.slo_unreachable / st.slo_seen)


def budget_spare(spec: PlannerSpec, st: PlannerState) -> bool:
    """Whether at least ``spare_budget_share`` of the error budget is unspent (misses of
    unreachable prompts spend none of it)."""
    miss = avoidable_miss_share(spec, st)
    t = spec.tuning
    return miss is not None and miss <= (1.0 - t.spare_budget_share) * (1.0 - spec.attainment)


def budget_spent(spec: PlannerSpec, st: PlannerState) -> bool:
    """Whether the recent share of first tokens beyond the TTFT target that more capacity
    could have met (`avoidable_miss_share`) exceeds the error budget (False while too few
    were seen to tell). Prompts too long for any pool to prefill in time miss whatever the
    fleet: counting them would hold and add replicas that buy nothing (synthetic-shift's
    long-context phase: 14% of its prompts)."""
    miss = avoidable_miss_share(spec, st)
    return miss is not None and miss > 1.0 - spec.attainment


# ------------------------------------------------------------------------- 5. sizing


def correction(spec: PlannerSpec, st: PlannerState, pool: PoolTarget) -> float:
    """The pool's own correction once it has been measured; before that, the mean of the
    measured pools of its role, else 1. Much of what a correction learns is shared by the
    role's pools (the traffic's burstiness and lengths, queueing the model leaves out): at
    1.0 an unmeasured pool looks cheaper than the measured ones, and after a burst raised
    theirs the planner fled to it (Azure trace: 7 H100 prefill replicas started at minute 10
    while MI300X, at ~2/3 of the price per request, stood at 1.97)."""
    own = st.correction.get(pool.name)
    if own is not None:
        return own
    known = [st.correction[p.name] for p in spec.by_role(pool.role) if p.name in st.correction]
    return sum(known) / len(known) if known else 1.0


def _servers(spec: PlannerSpec, st: PlannerState, replicas: int) -> int:
    """Servers a pool of ``replicas`` queues as: one per replica up to
    ``pooled_servers_max`` while arrivals are smooth (Poisson-like, `dispersion` below
    ``burst_dispersion``); one otherwise: a burst of seconds queues on every replica at once,
    and the per-replica sizing is the margin for it."""
    if spec.tuning.pooled_servers_max <= 1 or replicas <= 1:
        return 1
    index = dispersion(spec, st)
    if index is None or index >= spec.tuning.burst_dispersion:
        return 1
    return min(replicas, spec.tuning.pooled_servers_max)


def cold_mixed(spec: PlannerSpec, st: PlannerState) -> bool:
    """Whether mixed pools are priced at ``cold_mixed_factor`` at least: the planner chooses
    between the mixed and the split path, arrivals are not yet told smooth or bursty, and the
    error budget is spent. (Without a split path to choose, pricing the mixed pools dearer
    would only start more of them.)"""
    return (
        spec.tuning.cold_mixed_factor > 1
        and _splits(spec)
        and dispersion(spec, st) is None
        and budget_spent(spec, st)
    )


def priced_correction(spec: PlannerSpec, st: PlannerState, pool: PoolTarget) -> float:
    """The correction ``pool`` is sized at: its own (`correction`), for a mixed pool at least
    ``cold_mixed_factor`` while `cold_mixed`."""
    corr = correction(spec, st, pool)
    if pool.role == "mixed" and cold_mixed(spec, st):
        return max(corr, spec.tuning.cold_mixed_factor)
    return corr


def _cap(spec: PlannerSpec, pool: PoolTarget, d: Demand, st: PlannerState, replicas: int = 1) -> Capacity:
    """Per-replica capacity of ``pool`` for ``d`` when it runs ``replicas`` (queueing as one)."""
    return capacity(
        pool, spec.model, d.isl, d.osl, spec.ttft_s, spec.itl_s, spec.attainment, spec.tuning,
        priced_correction(spec, st, pool), d.typical, d.spread, _servers(spec, st, replicas),
    )  # fmt: skip


def _covers(rate: float, alloc: Mapping[str, int], caps: Mapping[str, Capacity]) -> bool:
    return sum(n * caps[k].rps for k, n in alloc.items()) >= rate - 1e-9


def allocate_pooled(
    spec: PlannerSpec, pools: list[PoolTarget], d: Demand, st: PlannerState
) -> tuple[dict[str, int], bool, dict[str, Capacity]]:
    """`allocate` with each pool's capacity at the replicas it is given (a pool of n
    replicas queues as one of n servers, so its capacity per replica grows with n).

    Fixed point from the single-server sizing: each round prices the pools at the previous
    round's counts (at first the single-server allocation, or the maxes when that falls
    short) and allocates again; the cheapest allocation that covers the rate at its own
    counts' capacities wins (the single-server one always does: more servers never lower
    the capacity). Returns (replicas, short, capacities at those replicas)."""
    caps = {p.name: _cap(spec, p, d, st) for p in pools}
    alloc, short = allocate(d.rate, pools, caps)
    if spec.tuning.pooled_servers_max <= 1 or all(_servers(spec, st, p.max_replicas) == 1 for p in pools):
        return alloc, short, caps
    price = {p.name: p.price_per_hour for p in pools}
    best = None if short else (sum(n * price[k] for k, n in alloc.items()), alloc)
    counts = {p.name: p.max_replicas for p in pools} if short else alloc
    for _ in range(5):
        trial, trial_short = allocate(
            d.rate, pools, {p.name: _cap(spec, p, d, st, counts[p.name]) for p in pools}
        )
        own = {p.name: _cap(spec, p, d, st, trial[p.name]) for p in pools}
        cost = sum(n * price[k] for k, n in trial.items())
        if not trial_short and _covers(d.rate, trial, own) and (best is None or cost < best[0]):
            best = (cost, trial)
        if trial == counts:
            break
        counts = trial
    if best is None:  # short even at the maxes' pooled capacity
        return alloc, True, {p.name: _cap(spec, p, d, st, alloc[p.name]) for p in pools}
    chosen = best[1]
    return chosen, False, {p.name: _cap(spec, p, d, st, chosen[p.name]) for p in pools}


_Key = tuple[float, float, tuple[int, ...]]  # (cost, -capacity, combination): least is best


def _cheapest_combo(
    rate: float, pools: list[PoolTarget], caps: Mapping[str, Capacity], ranges: list[int]
) -> tuple[int, ...] | None:
    """Extra replicas per pool covering ``rate`` at the least cost (then the most capacity,
    then the first in lexicographic order): exhaustive over up to 4096 combinations; None
    when the search is larger or nothing covers the rate. The pool of the widest range is
    solved for rather than enumerated (:func:`_cheapest_given`)."""
    if math.prod(r + 1 for r in ranges) > 4096:
        return None
    rps = [caps[p.name].rps for p in pools]
    prices = [p.price_per_hour for p in pools]
    free = max(range(len(pools)), key=lambda i: ranges[i])
    best: _Key | None = None
    for head in itertools.product(*(range(r + 1) for i, r in enumerate(ranges) if i != free)):
        found = _cheapest_given(rate, rps, prices, free, ranges[free], head, best)
        if found is not None and (best is None or found < best):
            best = found
    return None if best is None else best[2]


def _combo_key(rate: float, rps: list[float], prices: list[float], combo: tuple[int, ...]) -> _Key | None:
    cap = sum(n * c for n, c in zip(combo, rps, strict=True))
    if cap < rate - 1e-9:
        return None
    return (sum(n * p for n, p in zip(combo, prices, strict=True)), -cap, combo)


def _cheapest_given(
    rate: float,
    rps: list[float],
    prices: list[float],
    free: int,
    top: int,
    head: tuple[int, ...],
    bound: _Key | None,
) -> _Key | None:
    """The least key among ``head`` on the other pools plus 0..``top`` replicas of pool
    ``free``; None when none covers the rate or all cost more than ``bound``. The capacity
    and cost grow with the count, so the answer is the fewest replicas that cover the rate
    (found from the arithmetic, confirmed with the exact sums), or more of them while they
    cost the same (rounding, a free pool) and add capacity."""

    def key(n: int) -> _Key | None:
        return _combo_key(rate, rps, prices, (*head[:free], n, *head[free:]))

    zero = (*head[:free], 0, *head[free:])
    cost0 = sum(n * p for n, p in zip(zero, prices, strict=True))
    if bound is not None and prices[free] >= 0 and cost0 > bound[0]:
        return None  # costs more than the best before any replica of pool ``free``
    need = (rate - 1e-9 - sum(n * c for n, c in zip(zero, rps, strict=True))) / rps[free]
    n = 0 if need <= 0 else (top if need >= top else max(0, math.ceil(need) - 1))
    while n > 0 and key(n - 1) is not None:
        n -= 1
    found = key(n)
    while found is None and n < top:
        n += 1
        found = key(n)
    while found is not None and n < top:
        nxt = key(n + 1)
        if nxt is None or (prices[free] > 0 and nxt[0] != found[0]):
            break
        n += 1
        found = min(found, nxt)
    return found


def allocate(
    rate: float, pools: list[PoolTarget], caps: Mapping[str, Capacity]
) -> tuple[dict[str, int], bool]:
    """Replicas per pool serving ``rate`` requests/s at the lowest cost per hour.

    Every pool starts at its min; pools that cannot meet the SLO (capacity 0) stay there.
    Replicas are whole, so the cheapest fleet is not always the one of the lowest price per
    request/s (one cheap small replica can beat one efficient big one): small searches are
    exhaustive, large ones fill the cheapest per request/s first and top up with the pool
    whose one replica is cheapest. Returns (replicas, short) where ``short`` means the maxes
    could not cover the rate.
    """
    out = {p.name: p.min_replicas for p in pools}
    remaining = rate - sum(p.min_replicas * caps[p.name].rps for p in pools)
    if remaining <= 1e-9:
        return out, False
    usable = sorted(
        (p for p in pools if caps[p.name].rps > 0 and p.max_replicas > p.min_replicas),
        key=lambda p: (p.price_per_hour / caps[p.name].rps, p.name),
    )
    if not usable:
        return out, True
    ranges = [
        min(p.max_replicas - p.min_replicas, math.ceil(remaining / caps[p.name].rps - 1e-9)) for p in usable
    ]
    exact = _cheapest_combo(remaining, usable, caps, ranges)
    if exact is not None:
        for n, p in zip(exact, usable, strict=True):
            out[p.name] += n
        return out, False
    short = True
    for p in usable:
        cap = caps[p.name].rps
        whole = min(p.max_replicas - out[p.name], int(remaining / cap + 1e-9))
        out[p.name] += whole
        remaining -= whole * cap
        if remaining <= 1e-9:
            short = False
            break
    while short:  # top up the remainder with the pool where it costs least
        options = [p for p in usable if out[p.name] < p.max_replicas]
        if not options:
            break
        p = min(
            options,
            key=lambda p: (p.price_per_hour * math.ceil(remaining / caps[p.name].rps - 1e-9), p.name),
        )
        add = min(p.max_replicas - out[p.name], math.ceil(remaining / caps[p.name].rps - 1e-9))
        out[p.name] += add
        remaining -= add * caps[p.name].rps
        short = remaining > 1e-9
    return out, short


def size(
    spec: PlannerSpec, demand: Mapping[str, Demand], st: PlannerState, plan: _Plan, report: bool = True
) -> None:
    """Raw targets per pool (before stabilisation and budget) into ``plan``. ``report=False``:
    a trial (only the targets count), so no capacity is computed for a role without demand."""
    every = {role for cls in classes(spec) for role in cls.roles}
    plan.unused = every - {r for cls in classes(spec) if demand[cls.name].rate >= MIN_RATE for r in cls.roles}
    for cls in classes(spec):
        d = demand[cls.name]
        for role in cls.roles:
            pools = spec.by_role(role)
            if d.rate < MIN_RATE:
                if report:
                    plan.caps.update({p.name: _cap(spec, p, d, st) for p in pools})
                plan.targets.update({p.name: p.min_replicas for p in pools})
                plan.above_need.update(p.name for p in pools if p.min_replicas > 0)
                continue
            caps = {p.name: _cap(spec, p, d, st) for p in pools}
            if not any(c.rps > 0 for c in caps.values()):
                plan.caps.update(caps)
                plan.infeasible.append(role)
                plan.unmet += d.rate
                plan.targets.update({p.name: None for p in pools})
                continue
            alloc, short, caps = allocate_pooled(spec, pools, d, st)
            if any(p.min_replicas for p in pools):  # the mins add replicas the demand does not need
                free, _ = allocate(d.rate, [replace(p, min_replicas=0) for p in pools], caps)
                if sum(alloc.values()) > sum(free.values()):
                    plan.above_need.update(p.name for p in pools if p.min_replicas > 0)
            plan.caps.update(caps)
            if not short and plan.running:
                alloc = _prefer_running(spec, pools, caps, d.rate, alloc, plan.running)
            plan.targets.update(alloc)
            if short:
                plan.limited = "max"
                plan.limited_pools += [p.name for p in pools if alloc.get(p.name) == p.max_replicas]
                plan.unmet += max(0.0, d.rate - sum(n * caps[k].rps for k, n in alloc.items()))
    _keep_decode_for_prefill(spec, plan)


def _prefer_running(
    spec: PlannerSpec,
    pools: list[PoolTarget],
    caps: Mapping[str, Capacity],
    rate: float,
    fresh: dict[str, int],
    running: Mapping[str, int],
) -> dict[str, int]:
    """The cheapest fleet within the replicas that run (or, when they fall short of ``rate``,
    the cheapest that keeps them all), instead of ``fresh``, when it costs at most
    ``pool_hysteresis`` more: otherwise a burst sized on one pool and a lull sized on another
    keep alternating, and the scale-down window holds both; and a scale-up would trade
    replicas that serve now for ones that serve only after they start."""
    held = {p.name: max(p.min_replicas, min(p.max_replicas, running.get(p.name, 0))) for p in pools}
    if sum(n * caps[k].rps for k, n in held.items()) < rate - 1e-9:
        kept = [replace(p, min_replicas=held[p.name]) for p in pools]
    else:
        kept = [replace(p, max_replicas=held[p.name]) for p in pools]
    sticky, short = allocate(rate, kept, caps)
    price = {p.name: p.price_per_hour for p in pools}
    cost_sticky = sum(n * price[k] for k, n in sticky.items())
    cost_fresh = sum(n * price[k] for k, n in fresh.items())
    if short or cost_sticky > cost_fresh * (1 + spec.tuning.pool_hysteresis) + 1e-9:
        return fresh
    return sticky


def _keep_decode_for_prefill(spec: PlannerSpec, plan: _Plan) -> None:
    """A running prefill pool needs somewhere to send its KV caches."""
    prefill = sum(plan.targets.get(p.name) or 0 for p in spec.by_role("prefill"))
    decode = [p for p in spec.by_role("decode") if p.max_replicas > 0]  # one that may run at all
    if prefill and decode and not sum(plan.targets.get(p.name) or 0 for p in decode):
        cheapest = min(decode, key=lambda p: (p.price_per_hour, p.name))
        plan.targets[cheapest.name] = 1


# ------------------------------------------------------------------------- 6. split threshold


def candidates(spec: PlannerSpec, *extra: int | None) -> list[int]:
    """Thresholds the planner considers: the histogram's bounds within the tuning's range,
    the range's ends, "split everything" (1) and "split nothing" (longer than the context)."""
    t = spec.tuning
    out = {t.min_split_tokens, t.max_split_tokens}
    out |= {int(b) for b in lengths.BUCKETS if t.min_split_tokens < b < t.max_split_tokens}
    if t.extreme_splits:
        out |= {1, spec.model.max_model_len + 1}
    out |= {x for x in extra if x is not None}
    return sorted(out)


def fleet_cost(spec: PlannerSpec, plan: _Plan) -> float:
    """USD per hour of a sized plan, plus a prohibitive price per request/s it leaves unserved
    (so that among fleets that all fall short the one serving the most wins)."""
    cost = sum((plan.targets.get(p.name) or 0) * p.price_per_hour for p in spec.pools)
    return cost + UNMET_PENALTY * plan.unmet


def _splits(spec: PlannerSpec) -> bool:
    roles = {p.role for p in spec.pools}
    return spec.tune_split and {"prefill", "decode", "mixed"} <= roles


def _trial(
    spec: PlannerSpec, total: Total, st: PlannerState, threshold: int, running: Mapping[str, int] | None
) -> _Plan:
    trial = _Plan(running=running or {})
    size(spec, class_demand(spec, total, threshold), st, trial, report=False)
    return trial


def _served_by(plan: _Plan, running: Mapping[str, int]) -> bool:
    """Whether the replicas that run cover ``plan``."""
    return plan.unmet <= 0 and all((n or 0) <= running.get(k, 0) for k, n in plan.targets.items())


def _stay(
    spec: PlannerSpec, now: Total, st: PlannerState, current: int, best: int, running: Mapping[str, int]
) -> bool:
    """Whether to keep ``current`` although ``best`` is cheaper at the held demand: the
    replicas that run serve today's demand at ``current``, and ``best`` costs more at it.
    The held demand is a past peak: a switch for it starts replicas on the other path now
    while the window holds the old ones anyway (synthetic-bursts: after each burst a prefill
    and a decode replica started beside the 3 mixed ones held, and served nothing)."""
    here = _trial(spec, now, st, current, running)
    return (
        _served_by(here, running)
        and fleet_cost(spec, _trial(spec, now, st, best, running)) > fleet_cost(spec, here) + 1e-9
    )


def plan_threshold(
    spec: PlannerSpec,
    total: Total,
    st: PlannerState,
    running: Mapping[str, int] | None = None,
    now: Total | None = None,
) -> tuple[int, dict[int, float]]:
    """The threshold to size the fleet for: the one whose whole fleet costs least per hour at
    the planned demand. A new threshold must save ``split_hysteresis`` of the current cost
    (integer replicas make costs jumpy) in ``split_confirm_intervals`` decisions in a row
    (the same threshold, ``st.plan_candidate``, counted in ``st.plan_beaten``), or
    ``split_jump`` of it at once. Returns (threshold, cost per candidate)."""
    current = st.plan_threshold or st.split_threshold or spec.split_threshold
    if not _splits(spec):
        return current, {}
    costs = {x: fleet_cost(spec, _trial(spec, total, st, x, running)) for x in candidates(spec, current)}
    best = min(costs, key=lambda x: (costs[x], abs(math.log(x / current))))
    t = spec.tuning
    if costs[best] >= costs[current] * (1 - t.split_hysteresis) or (
        now is not None and now.rate < total.rate and _stay(spec, now, st, current, best, running or {})
    ):
        _unconfirmed(st)
        return current, costs
    if best == st.plan_candidate:
        st.plan_beaten += 1
    else:  # a different threshold leads: its count starts now
        st.plan_candidate, st.plan_beaten = best, 1
    in_force = sum((running or {}).get(p.name, 0) * p.price_per_hour for p in spec.pools)
    if (
        st.plan_beaten < t.split_confirm_intervals
        and costs[best] > costs[current] * (1 - t.split_jump)
        and costs[current] <= in_force + 1e-9
    ):
        # what runs serves the current threshold: wait for the saving to be confirmed
        return current, costs
    _unconfirmed(st)
    return best, costs


def _unconfirmed(st: PlannerState) -> None:
    st.plan_candidate, st.plan_beaten = None, 0


def _pressure(spec: PlannerSpec, obs: Observation, role: Role) -> float:
    """Observed latency / target of a role's ready pools (the worst of TTFT and ITL where the
    role produces them): above 1 the path is overloaded whatever the model says."""
    worst = 0.0
    for reading in _readings(spec, obs, role):
        m = reading.metrics
        if role != "decode" and m.mean_ttft_s is not None:
            worst = max(worst, m.mean_ttft_s / spec.ttft_s)
        if role != "prefill" and m.mean_itl_s is not None:
            worst = max(worst, m.mean_itl_s / spec.itl_s)
    return worst


def _path_load(
    spec: PlannerSpec,
    obs: Observation,
    st: PlannerState,
    total: Total,
    threshold: int,
    now: Mapping[str, Demand],
    pressure: Mapping[Role, float],
) -> float:
    """Highest load of the paths' ready replicas if the router used ``threshold``: the
    model's demand / capacity, or the observed latency / target (``pressure``) scaled by
    how much more (or less) demand the path would get than it gets now (``now``: the demand
    under the routed threshold)."""
    worst = 0.0
    for cls, d in zip(classes(spec), class_demand(spec, total, threshold).values(), strict=True):
        if d.observed <= 1e-9:
            continue
        for role in cls.roles:
            cap = sum(
                obs.pools[p.name].ready * _cap(spec, p, d, st, obs.pools[p.name].ready).rps
                for p in spec.by_role(role)
                if obs.pools[p.name].ready > 0
            )
            worst = max(worst, d.observed / cap if cap > 0 else math.inf)
            before = now[cls.name].observed
            if before > 1e-9:
                worst = max(worst, pressure[role] * d.observed / before)
    return worst


def route_threshold(spec: PlannerSpec, obs: Observation, st: PlannerState, total: Total, planned: int) -> int:
    """The threshold the router uses now: the one that loads the ready replicas of the two
    paths most evenly at the held demand (nearest the planned one on ties, and the planned
    one while it keeps every path under ``route_spill_load``). Replicas that are ready serve,
    whichever threshold they were started for; new ones take minutes."""
    if not _splits(spec):
        return planned
    routed = st.split_threshold if st.split_threshold is not None else spec.split_threshold
    now = class_demand(spec, total, routed)
    pressure = {role: _pressure(spec, obs, role) for cls in classes(spec) for role in cls.roles}
    options = {
        x: _path_load(spec, obs, st, total, x, now, pressure) for x in candidates(spec, planned, routed)
    }
    best = min(options, key=lambda x: (options[x], abs(math.log(x / planned))))
    if options[planned] <= spec.tuning.route_spill_load * 0.5 or not options[best] < options[planned]:
        return planned
    return best


# ------------------------------------------------------------------------- 7. stabilisation


def _in_window(t: float, now: float, window: float) -> bool:
    return now - t < window or t >= now  # the decision being made is always in its own window


def _window(
    history: list[tuple[float, int]], now: float, window: float, add: int | None
) -> list[tuple[float, int]]:
    """``history`` pruned to the window (plus the newest entry older than it, which tells
    that the window is spanned) with ``add`` appended (None: nothing)."""
    inside = [(t, v) for t, v in history if _in_window(t, now, window)]
    older = [(t, v) for t, v in history if not _in_window(t, now, window)]
    if add is not None:
        inside.append((now, add))
    return older[-1:] + inside


def window_peak(
    spec: PlannerSpec, pools: list[PoolTarget], st: PlannerState, now: float, caps: Mapping[str, float]
) -> float | None:
    """The most capacity (requests/s of today's shape, ``caps`` per replica) the role was
    recommended by one decision within the scale-down window. None when it cannot be told:
    a pool has no capacity at today's shape, or a decision of the window did not recommend
    every pool of the role."""
    if any(not (math.isfinite(caps[p.name]) and caps[p.name] > 0) for p in pools):
        return None
    window = down_window(spec, st, now)
    by_time: dict[float, dict[str, int]] = {}
    for p in pools:
        for t, n in st.recommendations.get(p.name, []):
            if _in_window(t, now, window):
                by_time.setdefault(t, {})[p.name] = n
    if not by_time or any(len(recs) != len(pools) for recs in by_time.values()):
        return None
    return max(sum(recs[p.name] * caps[p.name] for p in pools) for recs in by_time.values())


def _ups_and_downs(
    pools: list[PoolTarget],
    recs: Mapping[str, int | None],
    covered: Mapping[str, bool],
    obs: Observation,
    plan: _Plan,
) -> tuple[dict[str, int | None], list[PoolTarget]]:
    """(targets of the pools going up at once, pools that may go down); the others are held
    (``plan.held`` says why) or already where recommended."""
    out: dict[str, int | None] = {p.name: None for p in pools}
    downs: list[PoolTarget] = []
    for p in pools:
        reading = obs.pools[p.name]
        rec, cur = recs[p.name], reading.replicas
        if rec is None or rec == cur:
            continue
        if reading.starting > 0:
            plan.held[p.name] = "starting"
        elif rec > cur:
            out[p.name] = rec
        elif any(obs.pools[q.name].starting for q in pools):
            plan.held[p.name] = "starting"
        elif not covered[p.name]:
            plan.held[p.name] = "stabilising"
        else:
            downs.append(p)
    return out, downs


def _role_targets(
    spec: PlannerSpec,
    pools: list[PoolTarget],
    obs: Observation,
    st: PlannerState,
    now: float,
    plan: _Plan,
    covered: Mapping[str, bool],
    *,
    ups: bool = True,
) -> dict[str, int | None]:
    """Targets of one role's pools (``ups=False``: as if none could go up, when the budget
    stopped them). Up at once; down only while nothing of the role starts or goes up, and only
    to the cheapest running replicas that hold the most capacity the role was recommended by
    one decision within the scale-down window (HPA's stabilisation counted per role, so that
    a burst sized on one pool and a lull sized on another do not hold both). While the SLO's
    error budget is spent, or the peak cannot be valued, each pool keeps its own highest
    recommendation of the window instead. A role the plan no longer uses, idle for
    ``idle_release_s``, goes down to its recommendation at once (`_unused_and_idle`)."""
    recs = {p.name: plan.targets.get(p.name) for p in pools}
    if not ups:
        recs = {
            p.name: None if r is None else min(r, obs.pools[p.name].replicas)
            for p, r in zip(pools, recs.values(), strict=True)
        }
    out, downs = _ups_and_downs(pools, recs, covered, obs, plan)
    if not downs:
        return out
    if any(v is not None for v in out.values()):  # capacity moving in: none leaves until it serves
        plan.held.update({p.name: "moving-in" for p in downs})
        return out
    if _unused_and_idle(spec, pools[0].role, st, now, plan):  # sized at its min: recs are set
        out.update({p.name: recs[p.name] for p in downs})
        return out
    window = down_window(spec, st, now)
    caps = {p.name: plan.caps[p.name].rps if p.name in plan.caps else 0.0 for p in pools}
    keep = None
    peak = None if budget_spent(spec, st) else window_peak(spec, pools, st, now, caps)
    if peak is not None and all(r is not None for r in recs.values()):
        # the cheapest fleet holding the peak, each pool between what it must keep and what runs
        running = [
            replace(
                p,
                min_replicas=(recs[p.name] or 0) if p in downs else obs.pools[p.name].replicas,
                max_replicas=obs.pools[p.name].replicas,
            )
            for p in pools
        ]
        keep, short = allocate(peak, running, plan.caps)
        if short:
            keep = None
    for p in downs:
        if keep is not None:
            target = keep[p.name]
        else:  # per pool: the highest recommendation of the window
            target = max(n for t, n in st.recommendations[p.name] if _in_window(t, now, window))
        if target >= obs.pools[p.name].replicas:
            plan.held[p.name] = "stabilising"
        else:
            out[p.name] = target
    return out


def _unused_and_idle(spec: PlannerSpec, role: Role, st: PlannerState, now: float, plan: _Plan) -> bool:
    """Whether no demand class of ``plan`` uses ``role`` and its ready replicas have served
    nothing for ``idle_release_s`` while other roles served (`update_idle`)."""
    idle = st.idle_since.get(role)
    return role in plan.unused and idle is not None and now - idle >= spec.tuning.idle_release_s


def remembered(spec: PlannerSpec, st: PlannerState, total: Total, threshold: int, plan: _Plan) -> _Plan:
    """The plan the scale-down window remembers for this decision: ``plan``, or, when the
    forecast asks for more than the demand observed and the error budget is not spent, the
    fleet for the observed demand. Up is at once either way (``plan`` is applied); a trend
    that does not come true then holds its replicas only while they start, not for the whole
    window. With the budget spent the window holds what the forecast asked for, as before."""
    if spec.tuning.hold_forecast or total.rate <= total.observed or budget_spent(spec, st):
        return plan
    observed = _Plan(running=plan.running)
    size(spec, class_demand(spec, replace(total, rate=total.observed), threshold), st, observed, report=False)
    return observed


def record(spec: PlannerSpec, st: PlannerState, now: float, plan: _Plan) -> dict[str, bool]:
    """Add this decision's recommendations to the pools' windows (kept for the whole
    ``down_window_s``); per pool, whether the window in force (`down_window`) is spanned
    (recommendations older than it exist)."""
    covered: dict[str, bool] = {}
    window = down_window(spec, st, now)
    for p in spec.pools:
        st.recommendations[p.name] = _window(
            st.recommendations.get(p.name, []), now, spec.tuning.down_window_s, plan.targets.get(p.name)
        )
        covered[p.name] = any(not _in_window(t, now, window) for t, _ in st.recommendations[p.name])
    return covered


def roles(spec: PlannerSpec) -> list[list[PoolTarget]]:
    return [spec.by_role(role) for role in dict.fromkeys(p.role for p in spec.pools)]


def stabilise(
    spec: PlannerSpec,
    obs: Observation,
    st: PlannerState,
    now: float,
    plan: _Plan,
    covered: Mapping[str, bool],
) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for pools in roles(spec):
        out.update(_role_targets(spec, pools, obs, st, now, plan, covered))
    _make_before_break(spec, obs, plan, out)
    return {p.name: out[p.name] for p in spec.pools}


def _step(target: int | None, current: int) -> int:
    """Replicas a target adds (> 0) or removes (< 0); 0 for None (keep)."""
    return 0 if target is None else target - current


def _make_before_break(spec: PlannerSpec, obs: Observation, plan: _Plan, out: dict[str, int | None]) -> None:
    """Requests switching path (split <-> mixed) keep the old path's replicas until the new
    path's serve: a role of one path does not go down while a role that only the other path
    uses goes up or starts (synthetic-bursts at seed 11: the split path was released at a
    burst's onset while the mixed replicas for it were starting, and one mixed replica took
    the burst at 0.28 attainment)."""
    paths = {
        role: {c.name for c in classes(spec) if role in c.roles} for role in {p.role for p in spec.pools}
    }
    change = {p.name: _step(out[p.name], obs.pools[p.name].replicas) for p in spec.pools}
    moving = {p.role for p in spec.pools if obs.pools[p.name].starting > 0 or change[p.name] > 0}
    for p in spec.pools:
        if change[p.name] < 0 and any(not (paths[p.role] & paths[role]) for role in moving):
            out[p.name] = None
            plan.held[p.name] = "moving-in"


def _after_budget(
    spec: PlannerSpec,
    obs: Observation,
    st: PlannerState,
    now: float,
    plan: _Plan,
    covered: Mapping[str, bool],
    out: dict[str, int | None],
) -> None:
    """A role whose replicas were held for capacity moving in that the budget then cut: decide
    its scale-down again as if nothing went up (else it never scales down while the budget
    binds)."""
    for pools in roles(spec):
        if not any(plan.held.get(p.name) == "moving-in" for p in pools):
            continue
        if any((out.get(p.name) or 0) > obs.pools[p.name].replicas for p in pools):
            continue  # something still goes up
        for p in pools:
            plan.held.pop(p.name, None)
        again = _role_targets(spec, pools, obs, st, now, plan, covered, ups=False)
        for p in pools:
            if again[p.name] is not None and again[p.name] < obs.pools[p.name].replicas:  # type: ignore[operator]
                out[p.name] = again[p.name]


# ------------------------------------------------------------------------- 8. bounds and budget


def clamp_bounds(
    spec: PlannerSpec, obs: Observation, out: dict[str, int | None]
) -> tuple[LimitedBy | None, list[str]]:
    """Force every pool into [min, max] (even when the planner has no opinion). Returns
    ("max", the pools brought down to their max) when one was, else (None, [])."""
    at_max: list[str] = []
    for pool in spec.pools:
        want = out.get(pool.name)
        reading = obs.pools.get(pool.name)
        value = want if want is not None else (reading.replicas if reading is not None else None)
        if value is None:
            continue
        if value < pool.min_replicas:
            out[pool.name] = pool.min_replicas
        elif value > pool.max_replicas:
            out[pool.name] = pool.max_replicas
            at_max.append(pool.name)
    return ("max" if at_max else None), at_max


def _over_budget(spec: PlannerSpec, counts: Mapping[str, int]) -> bool:
    devices = sum(counts[p.name] * p.tp for p in spec.pools)
    cost = sum(counts[p.name] * p.price_per_hour for p in spec.pools)
    if spec.max_devices is not None and devices > spec.max_devices:
        return True
    return spec.max_cost_per_hour is not None and cost > spec.max_cost_per_hour + 1e-9


def _after(out: Mapping[str, int | None], obs: Observation, pool: str) -> int:
    """The replicas of ``pool`` once ``out`` is applied (``None``: what runs)."""
    wanted = out.get(pool)
    return obs.pools[pool].replicas if wanted is None else wanted


def apply_budget(spec: PlannerSpec, obs: Observation, out: dict[str, int | None]) -> list[str]:
    """Remove replicas, most expensive first (increases before existing ones), until the
    budget holds or every pool is at its min. Returns the pools it cut (sorted)."""
    counts = {p.name: _after(out, obs, p.name) for p in spec.pools}
    current = {p.name: obs.pools[p.name].replicas for p in spec.pools}
    cut: set[str] = set()
    while _over_budget(spec, counts):
        options = [p for p in spec.pools if counts[p.name] > p.min_replicas]
        if not options:
            break
        victim = max(options, key=lambda p: (counts[p.name] > current[p.name], p.price_per_hour, p.name))
        counts[victim.name] -= 1
        out[victim.name] = counts[victim.name]
        cut.add(victim.name)
    return sorted(cut)


# ------------------------------------------------------------------------- decide


def _tokens_per_s(reading: PoolReading) -> float | None:
    """Prompt plus generated tokens/s of a pool (None when either is unknown)."""
    m = reading.metrics
    if m.prompt_tokens_per_s is None or m.generation_tokens_per_s is None:
        return None
    return m.prompt_tokens_per_s + m.generation_tokens_per_s


def update_idle(spec: PlannerSpec, obs: Observation, st: PlannerState, now: float) -> None:
    """Per role, since when its ready replicas have served no token (prompt or generated)
    while the other roles served some: the router sends it nothing, spill included. Tokens,
    not requests: a decode instance's request counter is not where its work shows. A role
    with no ready replica, or with a rate unknown, is not idle; nor is any role while the
    whole service is (a lull is not a path the router left)."""
    for pools in roles(spec):
        role = pools[0].role
        ready = [obs.pools[p.name] for p in pools if obs.pools[p.name].ready > 0]
        rates = [_tokens_per_s(r) for r in ready]
        known = [x for x in rates if x is not None]
        busy = sum(_tokens_per_s(obs.pools[q.name]) or 0.0 for q in spec.pools if q.role != role)
        if ready and len(known) == len(rates) and sum(known) <= 0 and busy > 0:
            st.idle_since.setdefault(role, now)
        else:
            st.idle_since.pop(role, None)


def _fresh(state: PlannerState) -> PlannerState:
    return PlannerState.from_json(state.to_json())


def _hold(
    spec: PlannerSpec, obs: Observation, st: PlannerState, now: float, reason: str, message: str
) -> Decision:
    out: dict[str, int | None] = {p.name: None for p in spec.pools}
    limited, at_max = clamp_bounds(spec, obs, out)
    st.last_time = now
    _unconfirmed(st)  # a threshold's lead must be confirmed on good data, in a row
    return Decision(out, None, reason, message, {"held": "all"}, limited, st, tuple(at_max))


def _signals(
    spec: PlannerSpec,
    demand: Mapping[str, Demand],
    plan: _Plan,
    st: PlannerState,
    threshold: int,
    planned: int,
    costs: Mapping[int, float],
    now: float,
    source: str,
) -> dict[str, str]:
    sig: dict[str, str] = {}
    for name, d in demand.items():
        sig[f"{name}.rps"] = f"{d.observed:.3g}"
        sig[f"{name}.plannedRps"] = f"{d.rate:.3g}"
        sig[f"{name}.isl"] = f"{d.isl:.0f}"
        sig[f"{name}.osl"] = f"{d.osl:.0f}"
    for pool, cap in plan.caps.items():
        sig[f"{pool}.capacityRps"] = f"{cap.rps:.3g}"
        sig[f"{pool}.bottleneck"] = cap.bottleneck
        sig[f"{pool}.correction"] = f"{correction(spec, st, spec.pool(pool)):.3g}"
        target = plan.targets.get(pool)
        sig[f"{pool}.recommended"] = "-" if target is None else str(target)
    if st.slo_seen > 0:  # the error budget: share of first tokens within the TTFT target
        sig["ttftWithinTarget"] = f"{st.slo_met / st.slo_seen:.3g}"
        sig["ttftOutOfReach"] = f"{st.slo_unreachable / st.slo_seen:.3g}"
    sig["errorBudgetSource"] = source
    sig["errorBudget"] = (
        "unknown" if met_share(spec, st) is None else ("spent" if budget_spent(spec, st) else "ok")
    )
    sig["scaleDownWindowSeconds"] = f"{down_window(spec, st, now):.0f}"
    if cold_mixed(spec, st):
        sig["coldMixedFactor"] = f"{spec.tuning.cold_mixed_factor:.3g}"
    for role, since in sorted(st.idle_since.items()):
        sig[f"{role}.idleSeconds"] = f"{now - since:.0f}"
    sig["splitThreshold"] = str(threshold)
    sig["plannedSplitThreshold"] = str(planned)
    if planned in costs:
        sig["plannedCostPerHour"] = f"{costs[planned]:.3g}"
    return sig


def _limits(
    spec: PlannerSpec,
    obs: Observation,
    st: PlannerState,
    now: float,
    plan: _Plan,
    covered: Mapping[str, bool],
    out: dict[str, int | None],
) -> tuple[LimitedBy | None, list[str], bool, list[str]]:
    """Clamp ``out`` to the bounds and the budget: (the bound that bit, the pools it bit on,
    whether the budget cut, the pools a replicas.min keeps above the demand's need). The
    planner sizes every pool from its min up, so a min binds where the role runs more replicas
    than the demand alone would (counted over the role's pools: a min replica that serves in
    place of a cheaper pool's is needed) and the pool ends at its min (``min`` only when no max
    or budget bit)."""
    clamped, at_max = clamp_bounds(spec, obs, out)
    limited = clamped or plan.limited
    pools = sorted(set(at_max) | set(plan.limited_pools)) if limited == "max" else []
    cut = apply_budget(spec, obs, out)
    if cut:
        limited, pools = "budget", cut
        _after_budget(spec, obs, st, now, plan, covered, out)
    at_min = sorted(
        p.name for p in spec.pools if p.name in plan.above_need and _after(out, obs, p.name) == p.min_replicas
    )
    if limited is not None or not at_min:
        return limited, pools, bool(cut), []
    return "min", at_min, bool(cut), at_min


def _reason(
    obs: Observation, out: Mapping[str, int | None], plan: _Plan, budget_cut: bool, at_min: list[str]
) -> tuple[str, str]:
    ups = {k: v for k, v in out.items() if v is not None and v > obs.pools[k].replicas}
    downs = {k: v for k, v in out.items() if v is not None and v < obs.pools[k].replicas}
    moves = ", ".join(f"{k} {obs.pools[k].replicas}->{v}" for k, v in {**ups, **downs}.items())
    if plan.infeasible:
        return (
            "SloInfeasible",
            f"No {'/'.join(plan.infeasible)} pool meets the SLO for this demand; kept them. {moves}".strip(),
        )
    if ups and downs:
        return "Rebalanced", f"Moved capacity: {moves}."
    if ups:
        return ("BudgetLimited" if budget_cut else "ScaledUp"), f"Scaled up: {moves}."
    if downs:
        return "ScaledDown", f"Scaled down: {moves}."
    if budget_cut:
        return "BudgetLimited", "The budget allows no more replicas."
    if {"starting", "moving-in"} & set(plan.held.values()):
        return "WaitingForReplicas", "Holding while new replicas start: " + ", ".join(sorted(plan.held)) + "."
    if plan.held:
        return "StabilisingScaleDown", "Waiting out the scale-down window for " + ", ".join(
            sorted(plan.held)
        ) + "."
    if at_min:
        return (
            "Steady",
            f"Demand needs fewer replicas than replicas.min keeps ({', '.join(at_min)} at their min).",
        )
    return "Steady", "Capacity matches demand."


def decide(spec: PlannerSpec, observation: Observation, state: PlannerState, now: float) -> Decision:
    """Decide replicas per pool and the split threshold. Pure: no I/O, ``now`` in seconds.

    ``state`` is not modified; the next state is ``Decision.state``.
    """
    st = _fresh(state)
    problem = check(spec, observation)
    if problem is not None:
        return _hold(spec, observation, st, now, *problem)
    if st.last_good is not None and now - st.last_good > spec.tuning.gap_intervals * spec.interval_s:
        # what was recommended before the gap cannot vouch for it: the window starts again
        st.recommendations = {}
        st.idle_since = {}
        _unconfirmed(st)
    st.last_good = now
    update_idle(spec, observation, st, now)
    total = plan_total(spec, observation, st, now)
    routed = st.split_threshold if st.split_threshold is not None else spec.split_threshold
    update_corrections(spec, observation, st, class_demand(spec, total, routed))
    unreachable = unreachable_share(spec, st, total.lengths)
    source = update_budget(spec, observation, st, now, unreachable)
    floor = burst_floor(spec, st, total.observed, now)
    if floor > total.rate and budget_spent(spec, st):
        total = replace(total, rate=floor)
    held = held_total(spec, total, st, now)
    running = {name: r.replicas for name, r in observation.pools.items()}
    planned, costs = plan_threshold(spec, held, st, running, total)
    st.plan_threshold = planned
    demand = class_demand(spec, total, planned)
    plan = _Plan(running=running)
    size(spec, demand, st, plan)
    threshold = route_threshold(spec, observation, st, held, planned)
    covered = record(spec, st, now, remembered(spec, st, total, planned, plan))
    out = stabilise(spec, observation, st, now, plan, covered)
    limited, limited_pools, budget_cut, at_min = _limits(spec, observation, st, now, plan, covered, out)
    for name, value in out.items():
        if value is not None and value == observation.pools[name].replicas:
            out[name] = None
        elif value is not None:
            st.last_change[name] = now
    dwell = spec.tuning.route_dwell_intervals * spec.interval_s
    if threshold != routed and st.route_changed is not None and now - st.route_changed < dwell:
        threshold = routed  # too soon after the last move: the readings still mix both
    if threshold != routed:
        st.route_changed = now
    changed_threshold = threshold if threshold != routed else None
    st.split_threshold = threshold
    st.last_time = now
    reason, message = _reason(observation, out, plan, budget_cut, at_min)
    if unreachable >= UNREACHABLE_NOTE:
        longest = longest_reachable_prompt(spec, st)
        message += (
            f" {unreachable:.0%} of prompts are longer than {longest} tokens, which no pool"
            " prefills within the TTFT target: they miss it on any fleet."
        )
    signals = _signals(spec, demand, plan, st, threshold, planned, costs, now, source)
    if floor > 0:
        signals["burstFloorRps"] = f"{floor:.3g}"
    signals["demandSource"] = total.source
    return Decision(out, changed_threshold, reason, message, signals, limited, st, tuple(limited_pools))


def with_state(decision: Decision, state: PlannerState) -> Decision:
    """``decision`` carrying another state (for callers that keep state elsewhere)."""
    return replace(decision, state=state)


__all__ = ["Decision", "Demand", "PlannerState", "Trend", "decide"]
