"""Tandem's planner: a pure function from (spec, observation, state, now) to a decision.

Per interval:

1. **Check the data.** A pool that has ready replicas but no reading, an incomplete
   reading, a stale scrape, or an implausible number (NaN, infinity, a negative rate, KV
   usage above 1) stops the planner: it holds every pool (only the spec's min/max bounds
   still apply) and says why. Missing data is never read as zero load.
2. **Demand per class.** Requests at least ``split_threshold`` tokens long take the split
   path (prefill pools -> decode pools), shorter ones the mixed pools. Each class has a
   request rate (plus the backlog of waiting requests, to be drained within the lead time),
   a mean prompt (ISL) and output (OSL) length.
3. **Forecast** each class's rate over the next interval plus the replica lead time
   (:mod:`tandem.planner.forecast`); size for max(forecast, now): fast up.
4. **Correct the model online**: per pool, the ratio of observed to modelled latency at the
   observed per-replica load (Dynamo's correction factors, perf-anchors §3.3), smoothed and
   clamped, multiplies the model's times.
5. **Size** every role from :mod:`tandem.planner.capacity`: capacity per replica of the
   class's shape at the SLO, filled cheapest-per-request first (a pool that cannot meet the
   SLO is not used); mins first, maxes respected.
6. **Tune the split threshold**: move it by one step towards the path that serves a
   request of the threshold's length more cheaply, and down whenever the mixed pools miss
   the ITL target.
7. **Stabilise**: up at once; down only to the highest recommendation of the last
   ``down_window_s`` (HPA's scale-down stabilisation); no change to a pool while its
   previous scale-up is still starting, and no scale-down of a role while any of its pools
   is starting (the new capacity is not serving yet).
8. **Budget**: remove the most expensive replicas until devices and cost per hour fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tandem.planner import forecast
from tandem.planner.capacity import (
    Capacity,
    capacity,
    predicted_itl,
    predicted_ttft,
    prefill_seconds_per_token,
)
from tandem.planner.types import (
    Decision,
    LimitedBy,
    Observation,
    PlannerSpec,
    PlannerState,
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
    isl: float
    osl: float


@dataclass
class _Plan:
    """Working data of one decision (not kept)."""

    targets: dict[str, int | None] = field(default_factory=dict)
    caps: dict[str, Capacity] = field(default_factory=dict)
    limited: LimitedBy | None = None
    infeasible: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # pool -> why it was held


def classes(spec: PlannerSpec) -> list[DemandClass]:
    """The request paths the spec's pools provide."""
    roles = {p.role for p in spec.pools}
    out: list[DemandClass] = []
    if "prefill" in roles:
        out.append(DemandClass("split", ("prefill", "decode"), "prefill", "decode"))
    elif "decode" in roles and "mixed" not in roles:
        out.append(DemandClass("split", ("decode",), "decode", "decode"))
    if "mixed" in roles:
        out.append(DemandClass("mixed", ("mixed",), "mixed", "mixed"))
    return out


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


def observe_demand(
    spec: PlannerSpec, obs: Observation, cls: DemandClass
) -> tuple[float, float | None, float | None]:
    """(requests/s incl. backlog, mean ISL, mean OSL) of a class now; lengths None if unseen."""
    entry = _readings(spec, obs, cls.entry)
    exit_ = _readings(spec, obs, cls.exit) if cls.exit != cls.entry else []
    rate = sum(r.metrics.requests_per_s or 0.0 for r in entry)
    waiting = sum(r.metrics.waiting or 0.0 for r in entry + exit_)
    drain_s = spec.interval_s + spec.tuning.lead_time_s
    isl = _weighted([(r.metrics.mean_prompt_tokens, r.metrics.requests_per_s or 0.0) for r in entry])
    osl_src = exit_ or entry
    osl = _weighted(
        [(r.metrics.mean_output_tokens, r.metrics.generation_tokens_per_s or 0.0) for r in osl_src]
    )
    return rate + waiting / drain_s, isl, osl


def plan_demand(spec: PlannerSpec, obs: Observation, st: PlannerState, now: float) -> dict[str, Demand]:
    """Observed demand per class folded into the forecasts (updates ``st.forecast``)."""
    out: dict[str, Demand] = {}
    horizon = spec.interval_s + spec.tuning.lead_time_s
    for cls in classes(spec):
        rate, isl, osl = observe_demand(spec, obs, cls)
        st.forecast[cls.name] = forecast.update(st.forecast.get(cls.name), rate, now, spec.interval_s)
        lengths: list[float] = []
        for key, value, default in (("isl", isl, DEFAULT_ISL), ("osl", osl, DEFAULT_OSL)):
            name = f"{cls.name}.{key}"
            if value is not None and value > 0:
                st.forecast[name] = forecast.update(st.forecast.get(name), value, now, spec.interval_s)
            known = st.forecast.get(name)
            lengths.append(known.level if known is not None and known.level is not None else default)
        predicted = forecast.predict(st.forecast[cls.name], horizon, spec.interval_s) or 0.0
        out[cls.name] = Demand(max(rate, predicted), rate, lengths[0], max(1.0, lengths[1]))
    return out


# ------------------------------------------------------------------------- 4. correction


def _ratio(spec: PlannerSpec, pool: PoolTarget, reading: PoolReading, demand: Demand) -> float | None:
    """Observed / modelled latency of one pool, or None when the sample is not informative."""
    m = reading.metrics
    per_replica = (m.requests_per_s or 0.0) / reading.ready
    backlog = (m.waiting or 0.0) / reading.ready
    if backlog > 2:
        return None  # a queue measures the backlog, not the model
    if pool.role == "prefill":
        if m.mean_ttft_s is None or per_replica * spec.interval_s < MIN_SAMPLES:
            return None
        pred = predicted_ttft(pool, spec.model, demand.isl, per_replica)
        return m.mean_ttft_s / pred if pred else None
    if m.mean_itl_s is None or not m.running:
        return None
    pred_itl = predicted_itl(pool, spec.model, demand.isl, demand.osl, m.running / reading.ready)
    if pool.role == "mixed":
        rho_p = (
            (m.prompt_tokens_per_s or 0.0)
            / reading.ready
            * prefill_seconds_per_token(pool, spec.model, demand.isl)
        )
        pred_itl /= max(0.05, 1 - min(0.95, rho_p))
    return m.mean_itl_s / pred_itl if pred_itl > 0 else None


def update_corrections(
    spec: PlannerSpec, obs: Observation, st: PlannerState, demand: Mapping[str, Demand]
) -> None:
    t = spec.tuning
    for cls in classes(spec):
        d = demand[cls.name]
        for role in cls.roles:
            for pool in spec.by_role(role):
                reading = obs.pools[pool.name]
                if reading.ready == 0:
                    continue
                ratio = _ratio(spec, pool, reading, d)
                if ratio is None or not math.isfinite(ratio):
                    continue
                ratio = min(t.correction_max, max(t.correction_min, ratio))
                old = st.correction.get(pool.name, 1.0)
                st.correction[pool.name] = (1 - t.correction_alpha) * old + t.correction_alpha * ratio


# ------------------------------------------------------------------------- 5. sizing


def _cap(spec: PlannerSpec, pool: PoolTarget, d: Demand, st: PlannerState) -> Capacity:
    return capacity(
        pool, spec.model, d.isl, d.osl, spec.ttft_s, spec.itl_s, spec.attainment, spec.tuning,
        st.correction.get(pool.name, 1.0),
    )  # fmt: skip


def allocate(
    rate: float, pools: list[PoolTarget], caps: Mapping[str, Capacity]
) -> tuple[dict[str, int], bool]:
    """Replicas per pool serving ``rate`` requests/s, cheapest per request first.

    Every pool starts at its min; pools that cannot meet the SLO (capacity 0) stay there.
    Returns (replicas, short) where ``short`` means the maxes could not cover the rate.
    """
    out = {p.name: p.min_replicas for p in pools}
    remaining = rate - sum(p.min_replicas * caps[p.name].rps for p in pools)
    usable = sorted(
        (p for p in pools if caps[p.name].rps > 0),
        key=lambda p: (p.price_per_hour / caps[p.name].rps, p.name),
    )
    for p in usable:
        if remaining <= 1e-9:
            break
        add = min(p.max_replicas - p.min_replicas, math.ceil(remaining / caps[p.name].rps - 1e-9))
        add = max(0, add)
        out[p.name] += add
        remaining -= add * caps[p.name].rps
    return out, remaining > 1e-9


def size(spec: PlannerSpec, demand: Mapping[str, Demand], st: PlannerState, plan: _Plan) -> None:
    """Raw targets per pool (before stabilisation and budget) into ``plan``."""
    for cls in classes(spec):
        d = demand[cls.name]
        for role in cls.roles:
            pools = spec.by_role(role)
            caps = {p.name: _cap(spec, p, d, st) for p in pools}
            plan.caps.update(caps)
            if not any(c.rps > 0 for c in caps.values()) and d.rate > 0:
                plan.infeasible.append(role)
                plan.targets.update({p.name: None for p in pools})
                continue
            alloc, short = allocate(d.rate, pools, caps)
            plan.targets.update(alloc)
            if short:
                plan.limited = "max"
    _keep_decode_for_prefill(spec, plan)


def _keep_decode_for_prefill(spec: PlannerSpec, plan: _Plan) -> None:
    """A running prefill pool needs somewhere to send its KV caches."""
    prefill = sum(plan.targets.get(p.name) or 0 for p in spec.by_role("prefill"))
    decode = spec.by_role("decode")
    if prefill and decode and not sum(plan.targets.get(p.name) or 0 for p in decode):
        cheapest = min(decode, key=lambda p: (p.price_per_hour, p.name))
        plan.targets[cheapest.name] = max(1, min(cheapest.max_replicas, 1))


# ------------------------------------------------------------------------- 6. split threshold


def _path_cost(spec: PlannerSpec, roles: tuple[Role, ...], isl: float, osl: float, st: PlannerState) -> float:
    """Cheapest USD per (request/s)-hour of requests of shape (isl, osl) along ``roles``."""
    d = Demand(0.0, 0.0, isl, osl)
    total = 0.0
    for role in roles:
        costs = [p.price_per_hour / c.rps for p in spec.by_role(role) if (c := _cap(spec, p, d, st)).rps > 0]
        if not costs:
            return math.inf
        total += min(costs)
    return total


def _mixed_itl(spec: PlannerSpec, obs: Observation) -> float | None:
    readings = _readings(spec, obs, "mixed")
    return _weighted([(r.metrics.mean_itl_s, r.metrics.generation_tokens_per_s or 1.0) for r in readings])


def tune_split(spec: PlannerSpec, obs: Observation, st: PlannerState, demand: Mapping[str, Demand]) -> int:
    """The next split threshold (tokens); one multiplicative step per decision at most."""
    current = st.split_threshold if st.split_threshold is not None else spec.split_threshold
    roles = {p.role for p in spec.pools}
    if not spec.tune_split or not {"prefill", "decode", "mixed"} <= roles:
        return current
    t = spec.tuning
    up = min(t.max_split_tokens, round(current * t.split_step / 64) * 64)
    down = max(t.min_split_tokens, round(current / t.split_step / 64) * 64)
    osl = max(d.osl for d in demand.values())
    itl = _mixed_itl(spec, obs)
    split: tuple[Role, ...] = ("prefill", "decode")
    mixed: tuple[Role, ...] = ("mixed",)
    if itl is not None and itl > spec.itl_s * t.itl_headroom:
        return down  # the mixed pools already miss the ITL target: send them less
    healthy = itl is None or itl < 0.7 * spec.itl_s * t.itl_headroom
    if healthy and _path_cost(spec, mixed, up, osl, st) < _path_cost(spec, split, up, osl, st):
        return up
    if _path_cost(spec, split, down, osl, st) < _path_cost(spec, mixed, down, osl, st):
        return down
    return current


# ------------------------------------------------------------------------- 7. stabilisation


def _stabilise_pool(
    spec: PlannerSpec, pool: PoolTarget, obs: Observation, st: PlannerState, now: float, plan: _Plan
) -> int | None:
    reading = obs.pools[pool.name]
    rec = plan.targets.get(pool.name)
    window = spec.tuning.down_window_s
    past = st.recommendations.get(pool.name, [])
    history = [(t, n) for t, n in past if now - t < window]
    older = [(t, n) for t, n in past if now - t >= window]
    covered = bool(older)  # recommendations span the whole window
    if rec is not None:
        history.append((now, rec))
    st.recommendations[pool.name] = older[-1:] + history
    cur = reading.replicas
    if rec is None or rec == cur:
        return None
    if reading.starting > 0:
        plan.held[pool.name] = "starting"
        return None
    if rec > cur:
        return rec
    if any(obs.pools[p.name].starting for p in spec.by_role(pool.role)):
        plan.held[pool.name] = "starting"
        return None
    target = max(n for _, n in history)
    if target >= cur or not covered:
        plan.held[pool.name] = "stabilising"
        return None
    return target


def stabilise(
    spec: PlannerSpec, obs: Observation, st: PlannerState, now: float, plan: _Plan
) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for pool in spec.pools:
        out[pool.name] = _stabilise_pool(spec, pool, obs, st, now, plan)
    return out


# ------------------------------------------------------------------------- 8. bounds and budget


def clamp_bounds(spec: PlannerSpec, obs: Observation, out: dict[str, int | None]) -> LimitedBy | None:
    """Force every pool into [min, max] (even when the planner has no opinion)."""
    limited: LimitedBy | None = None
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
            limited = "max"
    return limited


def _over_budget(spec: PlannerSpec, counts: Mapping[str, int]) -> bool:
    devices = sum(counts[p.name] * p.tp for p in spec.pools)
    cost = sum(counts[p.name] * p.price_per_hour for p in spec.pools)
    if spec.max_devices is not None and devices > spec.max_devices:
        return True
    return spec.max_cost_per_hour is not None and cost > spec.max_cost_per_hour + 1e-9


def apply_budget(spec: PlannerSpec, obs: Observation, out: dict[str, int | None]) -> bool:
    """Remove replicas, most expensive first (increases before existing ones), until the
    budget holds or every pool is at its min. Returns True if anything was cut."""
    counts: dict[str, int] = {}
    for p in spec.pools:
        want = out.get(p.name)
        counts[p.name] = want if want is not None else obs.pools[p.name].replicas
    current = {p.name: obs.pools[p.name].replicas for p in spec.pools}
    cut = False
    while _over_budget(spec, counts):
        options = [p for p in spec.pools if counts[p.name] > p.min_replicas]
        if not options:
            break
        victim = max(options, key=lambda p: (counts[p.name] > current[p.name], p.price_per_hour, p.name))
        counts[victim.name] -= 1
        out[victim.name] = counts[victim.name]
        cut = True
    return cut


# ------------------------------------------------------------------------- decide


def _fresh(state: PlannerState) -> PlannerState:
    return PlannerState.from_json(state.to_json())


def _hold(
    spec: PlannerSpec, obs: Observation, st: PlannerState, now: float, reason: str, message: str
) -> Decision:
    out: dict[str, int | None] = {p.name: None for p in spec.pools}
    limited = clamp_bounds(spec, obs, out)
    st.last_time = now
    return Decision(out, None, reason, message, {"held": "all"}, limited, st)


def _signals(demand: Mapping[str, Demand], plan: _Plan, st: PlannerState, threshold: int) -> dict[str, str]:
    sig: dict[str, str] = {}
    for name, d in demand.items():
        sig[f"{name}.rps"] = f"{d.observed:.3g}"
        sig[f"{name}.plannedRps"] = f"{d.rate:.3g}"
        sig[f"{name}.isl"] = f"{d.isl:.0f}"
        sig[f"{name}.osl"] = f"{d.osl:.0f}"
    for pool, cap in plan.caps.items():
        sig[f"{pool}.capacityRps"] = f"{cap.rps:.3g}"
        sig[f"{pool}.bottleneck"] = cap.bottleneck
        sig[f"{pool}.correction"] = f"{st.correction.get(pool, 1.0):.3g}"
        target = plan.targets.get(pool)
        sig[f"{pool}.recommended"] = "-" if target is None else str(target)
    sig["splitThreshold"] = str(threshold)
    return sig


def _reason(
    obs: Observation, out: Mapping[str, int | None], plan: _Plan, budget_cut: bool
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
    if "starting" in plan.held.values():
        return "WaitingForReplicas", "Holding while new replicas start: " + ", ".join(sorted(plan.held)) + "."
    if plan.held:
        return "StabilisingScaleDown", "Waiting out the scale-down window for " + ", ".join(
            sorted(plan.held)
        ) + "."
    return "Steady", "Capacity matches demand."


def decide(spec: PlannerSpec, observation: Observation, state: PlannerState, now: float) -> Decision:
    """Decide replicas per pool and the split threshold. Pure: no I/O, ``now`` in seconds.

    ``state`` is not modified; the next state is ``Decision.state``.
    """
    st = _fresh(state)
    problem = check(spec, observation)
    if problem is not None:
        return _hold(spec, observation, st, now, *problem)
    demand = plan_demand(spec, observation, st, now)
    update_corrections(spec, observation, st, demand)
    threshold = tune_split(spec, observation, st, demand)
    plan = _Plan()
    size(spec, demand, st, plan)
    out = stabilise(spec, observation, st, now, plan)
    limited = clamp_bounds(spec, observation, out) or plan.limited
    budget_cut = apply_budget(spec, observation, out)
    if budget_cut:
        limited = "budget"
    for name, value in out.items():
        if value is not None and value == observation.pools[name].replicas:
            out[name] = None
        elif value is not None:
            st.last_change[name] = now
    changed_threshold = threshold if threshold != (st.split_threshold or spec.split_threshold) else None
    if st.split_threshold is None or changed_threshold is not None:
        st.split_threshold = threshold
    st.last_time = now
    reason, message = _reason(observation, out, plan, budget_cut)
    return Decision(
        out, changed_threshold, reason, message, _signals(demand, plan, st, threshold), limited, st
    )


def with_state(decision: Decision, state: PlannerState) -> Decision:
    """``decision`` carrying another state (for callers that keep state elsewhere)."""
    return replace(decision, state=state)


__all__ = ["Decision", "Demand", "PlannerState", "Trend", "decide"]
