"""Scenario tables for Tandem's pure planner (tandem.planner.core.decide)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from tandem.perf.catalog import get_accelerator
from tandem.perf.models import get_model
from tandem.planner import (
    Decision,
    Observation,
    PlannerSpec,
    PlannerState,
    PoolObservation,
    PoolReading,
    PoolTarget,
    decide,
    lengths,
)
from tandem.planner.core import Total, burst_floor, down_window, observe_total, plan_total
from tandem.planner.lengths import BUCKETS
from tandem.planner.types import Trend

MODEL = get_model("llama-3.1-70b", "fp8")


def target(name: str, role: str, acc: str, lo: int = 0, hi: int = 8) -> PoolTarget:
    a = get_accelerator(acc)
    return PoolTarget(name, role, a, 1, lo, hi, a.price_per_hour)  # type: ignore[arg-type]


SPEC = PlannerSpec(
    model=MODEL,
    pools=(
        target("prefill-mi300x", "prefill", "mi300x"),
        target("prefill-h100", "prefill", "h100"),
        target("decode-mi300x", "decode", "mi300x", lo=1),
        target("mixed-mi300x", "mixed", "mi300x", lo=1),
    ),
    ttft_s=2.0,
    itl_s=0.1,
    interval_s=30.0,
    tune_split=False,  # sizing scenarios: prompts of >= 512 tokens take the split path
)
# The same pools with the split threshold chosen by the planner (routing.disaggregation auto).
TUNED = replace(SPEC, tune_split=True)


def metrics(
    rps: float = 0.0, isl: float = 2000.0, osl: float = 100.0, waiting: float = 0.0, **kw: float | None
) -> PoolObservation:
    base = PoolObservation(
        waiting=waiting,
        running=kw.pop("running", 0.0),
        kv_usage=kw.pop("kv_usage", 0.1),
        prompt_tokens_per_s=rps * isl,
        generation_tokens_per_s=rps * osl,
        requests_per_s=rps,
        mean_ttft_s=None,
        mean_itl_s=None,
        mean_prompt_tokens=isl if rps else None,
        mean_output_tokens=osl if rps else None,
        scrape_age_s=0.0,
        # every prompt of the pool is isl tokens long (vLLM's request_prompt_tokens histogram)
        prompt_tokens_buckets=tuple((le, rps if le >= isl else 0.0) for le in BUCKETS) if rps else None,
    )
    return replace(base, **kw)


def reading(replicas: int, m: PoolObservation | None = None, starting: int = 0) -> PoolReading:
    return PoolReading(replicas, replicas - starting, starting, m if m is not None else metrics())


def fleet(
    split_rps: float = 0.0,
    mixed_rps: float = 0.0,
    replicas: tuple[int, int, int, int] = (1, 0, 1, 1),
    starting: tuple[int, int, int, int] = (0, 0, 0, 0),
    isl: float = 2000.0,
    **kw: float | None,
) -> Observation:
    """An observation of SPEC's four pools; the split demand enters the first ready prefill pool."""
    p_mi, p_h, d, m = replicas
    s_mi, s_h, s_d, s_m = starting
    return Observation(
        {
            "prefill-mi300x": reading(p_mi, metrics(split_rps, isl, 1, **kw), s_mi),
            "prefill-h100": reading(p_h, metrics(), s_h),
            "decode-mi300x": reading(d, metrics(0.0, isl, 100, running=split_rps * 3), s_d),
            "mixed-mi300x": reading(m, metrics(mixed_rps, 200, 100, running=mixed_rps * 3), s_m),
        }
    )


Step = tuple[float, Observation]


def run(steps: list[Step], spec: PlannerSpec = SPEC) -> Decision:
    state = PlannerState()
    decision: Decision | None = None
    for now, obs in steps:
        decision = decide(spec, obs, state, now)
        state = decision.state
    assert decision is not None
    return decision


def up(pool: str) -> Callable[[Decision], bool]:
    return lambda d: (d.replicas[pool] or 0) > 1


@dataclass(frozen=True)
class Case:
    name: str
    steps: list[Step]
    reason: str | set[str]
    check: Callable[[Decision], bool]
    spec: PlannerSpec = SPEC


def _all_none(d: Decision) -> bool:
    return all(v is None for v in d.replicas.values())


def _total_devices(d: Decision, obs: Observation) -> int:
    return sum((v if v is not None else obs.pools[k].replicas) for k, v in d.replicas.items())


BUSY = fleet(split_rps=4.0, replicas=(6, 0, 1, 1))

CASES = [
    Case("steady: idle fleet at its mins", [(30.0, fleet(replicas=(0, 0, 1, 1)))], "Steady", _all_none),
    Case(
        "ramp: rising long-prompt demand adds prefill, cheapest pool first",
        [(30.0 * i, fleet(split_rps=0.5 * i)) for i in range(1, 7)],
        "ScaledUp",
        lambda d: (d.replicas["prefill-mi300x"] or 0) > 1 and d.replicas["prefill-h100"] is None,
    ),
    Case(
        "burst: a 20x jump scales up in the same interval (fast up)",
        [(30.0, fleet(split_rps=0.2)), (60.0, fleet(split_rps=4.0))],
        "ScaledUp",
        up("prefill-mi300x"),
    ),
    Case(
        "burst beyond the cheapest pool's max spills to the next cheapest",
        [(30.0, fleet(split_rps=20.0))],
        "ScaledUp",
        lambda d: d.replicas["prefill-mi300x"] == 8 and (d.replicas["prefill-h100"] or 0) > 0,
    ),
    Case(
        "shift: short-prompt demand grows the mixed pool, not prefill",
        [(30.0, fleet(mixed_rps=60.0))],
        "ScaledUp",
        lambda d: (d.replicas["mixed-mi300x"] or 0) > 1 and d.replicas["prefill-mi300x"] is None,
    ),
    Case(
        "drop: no scale-down inside the stabilisation window",
        [(30.0, BUSY), (60.0, fleet(replicas=(6, 0, 1, 1)))],
        "StabilisingScaleDown",
        _all_none,
    ),
    Case(
        "drop: scale-down after the window, to the window's highest recommendation",
        [(30.0 * i, fleet(replicas=(6, 0, 1, 1))) for i in range(1, 25)],
        "ScaledDown",
        lambda d: d.replicas["prefill-mi300x"] == 0,
    ),
    Case(
        "gap: after a gap in the data the window starts again (no scale-down on the first reading)",
        [(30.0, BUSY), (60.0, BUSY), (700.0, fleet(replicas=(6, 0, 1, 1)))],
        "StabilisingScaleDown",
        _all_none,
    ),
    Case(
        "gap: a full window of data read after the gap allows the scale-down",
        [(30.0, BUSY), *((700.0 + 30.0 * i, fleet(replicas=(6, 0, 1, 1))) for i in range(22))],
        "ScaledDown",
        lambda d: d.replicas["prefill-mi300x"] == 0,
    ),
    Case(
        "missing data: a pool without a reading holds everything",
        [(30.0, Observation({k: v for k, v in BUSY.pools.items() if k != "decode-mi300x"}))],
        "MetricsMissing",
        _all_none,
    ),
    Case(
        "missing data: a ready pool without metrics holds everything",
        [(30.0, fleet(split_rps=4.0, waiting=None))],
        "MetricsMissing",
        _all_none,
    ),
    Case(
        "missing data: a failed query (incomplete) holds everything",
        [(30.0, fleet(split_rps=4.0, complete=False))],  # type: ignore[arg-type]
        "MetricsMissing",
        _all_none,
    ),
    Case(
        "NaN: an implausible value holds everything",
        [(30.0, fleet(split_rps=4.0, mean_ttft_s=math.nan))],
        "MetricsImplausible",
        _all_none,
    ),
    Case(
        "negative rate: holds everything (no scale-down on bad data)",
        [(30.0, BUSY), (700.0, fleet(split_rps=-1.0, replicas=(6, 0, 1, 1)))],
        "MetricsImplausible",
        _all_none,
    ),
    Case(
        "scrape gap: stale metrics hold everything",
        [(30.0, fleet(split_rps=4.0, scrape_age_s=300.0))],
        "ScrapeGap",
        _all_none,
    ),
    Case(
        "bounds: a pool below its min is raised even when data is missing",
        [(30.0, Observation({**fleet(waiting=None).pools, "decode-mi300x": reading(0, metrics())}))],
        "MetricsMissing",
        lambda d: d.replicas["decode-mi300x"] == 1 and d.limited_by is None,
    ),
    Case(
        "bounds: demand above every max is capped and says so",
        [(30.0, fleet(split_rps=100.0))],
        "ScaledUp",
        lambda d: (
            d.replicas["prefill-mi300x"] == 8
            and d.replicas["prefill-h100"] == 8
            and d.limited_by == "max"
            and d.limited_pools == ("decode-mi300x", "prefill-h100", "prefill-mi300x")
        ),
    ),
    Case(
        "budget: device cap removes the most expensive replicas first",
        [(30.0, fleet(split_rps=20.0))],
        {"BudgetLimited"},
        lambda d: (
            d.limited_by == "budget"
            and d.limited_pools != ()
            and all((d.replicas[p] or 0) < 20 for p in d.limited_pools)
            and _total_devices(d, fleet(split_rps=20.0)) <= 6
            and (d.replicas["prefill-h100"] or 0) == 0
        ),
        replace(SPEC, max_devices=6),
    ),
    Case(
        "budget: cost cap",
        [(30.0, fleet(split_rps=20.0))],
        {"BudgetLimited"},
        lambda d: d.limited_by == "budget",
        replace(SPEC, max_cost_per_hour=10.0),
    ),
    Case(
        "pending: no further change to a pool whose replicas are still starting",
        [(30.0, fleet(split_rps=8.0, replicas=(3, 0, 1, 1), starting=(2, 0, 0, 0)))],
        {"WaitingForReplicas", "ScaledUp"},
        lambda d: d.replicas["prefill-mi300x"] is None,
    ),
    Case(
        "pending: no scale-down of a role while one of its pools is starting",
        [
            (30.0, fleet(replicas=(1, 3, 1, 1), starting=(1, 0, 0, 0))),
            (700.0, fleet(replicas=(1, 3, 1, 1), starting=(1, 0, 0, 0))),
        ],
        "WaitingForReplicas",
        lambda d: d.replicas["prefill-h100"] is None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide_scenarios(case: Case) -> None:
    decision = run(case.steps, case.spec)
    reasons = {case.reason} if isinstance(case.reason, str) else case.reason
    assert decision.reason in reasons, (decision.reason, decision.message, decision.replicas)
    assert case.check(decision), (decision.replicas, decision.limited_by, decision.message)
    assert decision.reason[0].isupper() and " " not in decision.reason
    assert decision.message


def test_steady_state_after_scaling_is_steady() -> None:
    first = run([(30.0, fleet(split_rps=3.0))])
    p = first.replicas["prefill-mi300x"]
    assert p is not None and p > 1
    obs = fleet(split_rps=3.0, replicas=(p, 0, 1, 1))
    again = decide(SPEC, obs, first.state, 60.0)
    assert again.replicas["prefill-mi300x"] is None
    assert again.reason in {"Steady", "StabilisingScaleDown"}


def test_decide_is_pure_and_state_round_trips_through_json() -> None:
    state = PlannerState()
    before = state.to_json()
    d1 = decide(SPEC, fleet(split_rps=3.0), state, 30.0)
    assert state.to_json() == before  # the input state is not modified
    restored = PlannerState.from_json(d1.state.to_json())
    assert restored == d1.state
    d2a = decide(SPEC, fleet(split_rps=4.0), d1.state, 60.0)
    d2b = decide(SPEC, fleet(split_rps=4.0), restored, 60.0)
    assert d2a.replicas == d2b.replicas and d2a.signals == d2b.signals
    assert PlannerState.from_json("not json") == PlannerState()


def test_signals_explain_the_decision() -> None:
    d = run([(30.0, fleet(split_rps=3.0))])
    assert d.signals["split.rps"] == "3"
    assert "prefill-mi300x.capacityRps" in d.signals
    assert d.signals["prefill-mi300x.bottleneck"] in {"ttft", "compute"}
    assert all(isinstance(v, str) for v in d.signals.values())


def test_online_correction_raises_capacity_needs_when_latency_is_worse_than_modelled() -> None:
    slow = fleet(split_rps=1.0, replicas=(2, 0, 1, 1), mean_ttft_s=5.0)
    fast = fleet(split_rps=1.0, replicas=(2, 0, 1, 1))
    d_slow = run([(30.0 * i, slow) for i in range(1, 6)])
    d_fast = run([(30.0 * i, fast) for i in range(1, 6)])
    assert d_slow.state.correction["prefill-mi300x"] > 1.5
    assert "prefill-mi300x" not in d_fast.state.correction
    assert float(d_slow.signals["prefill-mi300x.capacityRps"]) < float(
        d_fast.signals["prefill-mi300x.capacityRps"]
    )


def test_an_unmeasured_pool_takes_its_roles_correction_not_one() -> None:
    # MI300X prefill measured 2.5x slower than modelled; the H100 prefill pool never ran.
    slow = fleet(split_rps=1.0, replicas=(2, 0, 1, 1), mean_ttft_s=5.0)
    d = run([(30.0 * i, slow) for i in range(1, 6)])
    measured = d.state.correction["prefill-mi300x"]
    assert measured > 1.5 and "prefill-h100" not in d.state.correction
    assert float(d.signals["prefill-h100.correction"]) == pytest.approx(measured, rel=1e-2)
    # so the H100 pool is priced at the same error, not at the model's word: what the planner
    # learned from a burst on one pool does not send the next scale-up to the other
    fast = run([(30.0 * i, fleet(split_rps=1.0, replicas=(2, 0, 1, 1))) for i in range(1, 6)])
    h100 = "prefill-h100.capacityRps"
    assert float(d.signals[h100]) < 0.8 * float(fast.signals[h100])
    # roles do not mix: the decode pool keeps its own (unmeasured here: 1)
    assert float(d.signals["decode-mi300x.correction"]) == pytest.approx(1.0)


def test_split_threshold_moves_down_when_the_mixed_pool_misses_itl() -> None:
    obs = fleet(mixed_rps=2.0)
    bad = Observation(
        {**obs.pools, "mixed-mi300x": reading(1, metrics(2.0, 200, 100, running=4, mean_itl_s=0.5))}
    )
    d = run([(30.0, bad)], TUNED)
    assert d.split_threshold is not None and d.split_threshold < SPEC.split_threshold
    assert d.state.split_threshold == d.split_threshold


def test_the_scale_down_window_shortens_only_while_the_error_budget_is_mostly_unspent() -> None:
    """Half the window (HPA's 300 s instead of 600 s) once the planner has watched a whole window, while at
    least half the error budget is unspent and demand has not fallen below a third of the window's
    peak (a burst's fleet is held for the next burst: synthetic-bursts' first burst found
    one replica when the initial fleet went after 300 s)."""
    spec, now = SPEC, 2000.0
    t = spec.tuning
    watched = {"mixed-mi300x": [(now - 700.0, 2), (now - 30.0, 2)]}
    steady = [(now - 60, 3.0), (now, 3.0)]
    good = replace(PlannerState(), recommendations=watched, slo_met=980.0, slo_seen=1000.0, demand=steady)
    assert down_window(spec, good, now) == 300.0 == t.down_window_s * t.spare_window_share
    shown = decide(spec, fleet(mixed_rps=3.0, replicas=(0, 0, 1, 2)), good, now + 30.0)
    assert shown.signals["scaleDownWindowSeconds"] == "300"
    # not yet watched for a whole window (a new service, or after a gap)
    young = replace(good, recommendations={"mixed-mi300x": [(now - 400.0, 2)]})
    assert down_window(spec, young, now) == t.down_window_s
    # more than half the error budget spent (1 - 0.9 = 10 %; 6 % missed)
    assert down_window(spec, replace(good, slo_met=940.0), now) == t.down_window_s
    # too few first tokens seen to tell
    assert down_window(spec, replace(good, slo_met=9.0, slo_seen=10.0), now) == t.down_window_s
    # demand fell to a quarter of the window's peak: a burst's fleet waits for the next one
    burst = replace(good, demand=[(now - 300, 12.0), (now, 3.0)])
    assert down_window(spec, burst, now) == t.down_window_s
    # a decline to 40% of it is a ramp down, not a burst that passed
    ramp = replace(good, demand=[(now - 540, 10.0), (now - 270, 7.0), (now, 4.0)])
    assert down_window(spec, ramp, now) == 300.0
    # a user's window is halved, not replaced
    short = replace(spec, tuning=replace(t, down_window_s=120.0))
    seen = replace(good, recommendations={"mixed-mi300x": [(now - 200.0, 2)]})
    assert down_window(short, seen, now) == 60.0


def _arrivals(rates: list[float], spec: PlannerSpec = SPEC) -> tuple[PlannerState, float]:
    """A state that saw ``rates`` (requests/s), one per interval, and the floor after the last."""
    st, floor = PlannerState(), 0.0
    for i, r in enumerate(rates):
        floor = burst_floor(spec, st, r, spec.interval_s * (i + 1))
    return st, floor


def test_a_min_above_the_demands_need_is_reported_as_the_bound() -> None:
    """The planner sizes every pool from its replicas.min up, so a min binds where the role
    runs more replicas than the demand alone would and the pool stays at its min (HPA's
    ScalingLimited/TooFewReplicas); a min replica the demand uses is no bound."""
    light = fleet(split_rps=0.5, replicas=(1, 0, 3, 1))
    high = replace(
        SPEC, pools=tuple(replace(p, min_replicas=3) if p.name == "decode-mi300x" else p for p in SPEC.pools)
    )
    d = decide(high, light, PlannerState(), 30.0)
    assert d.limited_by == "min" and d.replicas["decode-mi300x"] is None, (d.replicas, d.limited_by)
    assert d.limited_pools == ("decode-mi300x", "mixed-mi300x")  # no mixed demand at all
    assert d.reason == "Steady" and "decode-mi300x" in d.message and "replicas.min" in d.message
    # a min of 1 on a pool whose one replica the demand needs is within limits
    needed = fleet(split_rps=0.5, replicas=(1, 0, 1, 0))
    one = replace(
        SPEC, pools=tuple(replace(p, min_replicas=1 if p.name == "decode-mi300x" else 0) for p in SPEC.pools)
    )
    assert decide(one, needed, PlannerState(), 30.0).limited_by is None
    # a min replica on the dearer pool of a role that serves in place of the cheaper pool's:
    # the role runs what the demand needs, so no bound (prefill-h100 costs more than MI300X)
    h100 = replace(
        SPEC,
        pools=tuple(
            replace(p, min_replicas=1)
            if p.name == "prefill-h100"
            else replace(p, min_replicas=0)
            if p.role != "decode"
            else p
            for p in SPEC.pools
        ),
    )
    on_h100 = Observation(
        {
            "prefill-mi300x": reading(0, metrics()),
            "prefill-h100": reading(1, metrics(0.3, 2000.0, 1)),
            "decode-mi300x": reading(1, metrics(0.0, 2000.0, 100, running=0.9)),
            "mixed-mi300x": reading(0, metrics()),
        }
    )
    served = decide(h100, on_h100, PlannerState(), 30.0)
    assert served.replicas["prefill-mi300x"] in (None, 0) and served.limited_by is None, (
        served.replicas,
        served.limited_by,
    )
    # a max that bites is what is reported, not the min
    capped = replace(
        high, pools=tuple(replace(p, max_replicas=1) if p.role == "prefill" else p for p in high.pools)
    )
    at_max = decide(capped, fleet(split_rps=100.0, replicas=(1, 1, 3, 1)), PlannerState(), 30.0)
    assert at_max.limited_by == "max"
    assert at_max.limited_pools == ("decode-mi300x", "prefill-h100", "prefill-mi300x"), at_max.replicas


def test_bursty_arrivals_keep_a_floor_that_leaves_half_the_error_budget_beyond_it() -> None:
    # 2 req/s, and every tenth interval a 20 req/s burst: over before a replica could start
    rates = [20.0 if i % 10 == 9 else 2.0 for i in range(60)]
    st, floor = _arrivals(rates)
    assert 2.0 < floor < 20.0
    share = SPEC.tuning.burst_excess_share * (1 - SPEC.attainment)
    beyond = sum(max(0.0, r - floor) for r in rates)
    assert beyond == pytest.approx(share * sum(rates), rel=1e-3)  # the least such rate
    # smooth arrivals, and a steady ramp (dispersion from successive differences): no floor
    assert _arrivals([5.0 + (i % 2) * 0.2 for i in range(60)])[1] == 0.0
    assert _arrivals([1.0 + 0.2 * i for i in range(60)])[1] == 0.0
    # told only from ``burst_min_intervals`` intervals' arrivals
    often = [20.0 if i % 3 == 2 else 2.0 for i in range(60)]
    n = SPEC.tuning.burst_min_intervals
    assert _arrivals(often[: n - 1])[1] == 0.0 and _arrivals(often[:n])[1] > 2.0
    # ... or from as many as the burst memory holds, at intervals too long for that many
    slow = replace(SPEC, interval_s=400.0)
    assert _arrivals(often[:9], slow)[1] > 2.0
    # the load stopped: none once half a scale-down window passed without a request
    quiet_s = SPEC.tuning.down_window_s * SPEC.tuning.spare_window_share
    assert _arrivals(rates + [0.0] * int(quiet_s // SPEC.interval_s - 1))[1] > 2.0  # a gap between bursts
    assert _arrivals(rates + [0.0] * int(quiet_s // SPEC.interval_s + 1))[1] == 0.0
    # the memory forgets: an hour of 2 req/s after the bursts leaves none
    quiet = int(SPEC.tuning.burst_memory_s // SPEC.interval_s) + 1
    st, floor = _arrivals(rates + [2.0] * quiet)
    assert floor == 0.0 and all(r == 2.0 for _, r in st.arrivals)


def test_with_the_budget_spent_the_fleet_is_sized_for_the_burst_floor() -> None:
    """Between bursts the planner keeps the floor's capacity while first tokens miss the
    target, and plans for today's demand while the budget holds."""
    spent = PlannerState()
    now = 0.0
    for i in range(40):
        now = SPEC.interval_s * (i + 1)
        burst_floor(SPEC, spent, 20.0 if i % 10 == 9 else 2.0, now)
    spent.slo_met, spent.slo_seen = 800.0, 1000.0
    fine = replace(spent, slo_met=990.0, arrivals=list(spent.arrivals))
    now += SPEC.interval_s
    obs = fleet(split_rps=2.0, replicas=(2, 0, 1, 1))
    held = decide(SPEC, obs, spent, now)
    free = decide(SPEC, obs, fine, now)
    assert float(held.signals["burstFloorRps"]) > 2.0
    assert float(held.signals["split.plannedRps"]) + float(held.signals["mixed.plannedRps"]) == pytest.approx(
        float(held.signals["burstFloorRps"]), rel=0.01
    )
    assert float(free.signals["split.plannedRps"]) + float(free.signals["mixed.plannedRps"]) < 3.0


def test_with_bursty_arrivals_a_latency_sample_raises_the_prefill_correction_only_so_far() -> None:
    """A burst inside an interval reads as a slow model (the model prices the interval at its
    mean rate); with arrivals that bursty the burst floor holds capacity for it, so one
    sample may raise a prefill correction to ``burst_correction_max`` at most."""
    slow = fleet(split_rps=1.0, replicas=(2, 0, 1, 1), mean_ttft_s=5.0)
    bursty, _ = _arrivals([20.0 if i % 10 == 9 else 2.0 for i in range(60)])
    smooth, _ = _arrivals([2.0 + (i % 2) * 0.2 for i in range(60)])
    t = SPEC.tuning
    now = SPEC.interval_s * 61
    capped = decide(SPEC, slow, bursty, now).state.correction["prefill-mi300x"]
    free = decide(SPEC, slow, smooth, now).state.correction["prefill-mi300x"]
    assert capped == pytest.approx((1 - t.correction_alpha) + t.correction_alpha * t.burst_correction_max)
    assert free > capped + 0.1
    # a sample saying the model is pessimistic still counts in full
    fast = fleet(split_rps=1.0, replicas=(2, 0, 1, 1), mean_ttft_s=0.05)
    assert decide(SPEC, fast, bursty, now).state.correction["prefill-mi300x"] < 1.0


def test_with_bursty_arrivals_the_forecast_plans_no_burst_above_the_hours_highest() -> None:
    """A burst's rise is no ramp: with bursty arrivals the trend may not plan for a rate above
    the highest of the burst memory (replicas started for it would serve after it ended); a
    smooth ramp is still forecast ahead."""
    bursty, _ = _arrivals([20.0 if i % 10 == 9 else 2.0 for i in range(60)])
    smooth, _ = _arrivals([2.0 + (i % 2) * 0.2 for i in range(60)])
    now = SPEC.interval_s * 61
    for st in (bursty, smooth):
        st.forecast["total"] = Trend(level=15.0, trend=5.0, updated=now - SPEC.interval_s)
    obs = fleet(split_rps=18.0, replicas=(2, 0, 1, 1))
    capped = plan_total(SPEC, obs, bursty, now)
    free = plan_total(SPEC, obs, smooth, now)
    assert capped.observed == 18.0 and capped.rate == pytest.approx(20.0)
    assert free.rate > 30.0
    # today's rate counts even above the hour's highest
    fresh, _ = _arrivals([20.0 if i % 10 == 9 else 2.0 for i in range(60)])
    above = plan_total(SPEC, fleet(split_rps=25.0, replicas=(2, 0, 1, 1)), fresh, now)
    assert above.rate == pytest.approx(25.0)


def test_demand_comes_from_the_routers_arrivals_when_it_is_scraped() -> None:
    """An engine counts a request when it finishes, so during a burst its reading trails the
    demand by the queue it built; the router counts each prompt as it arrives."""
    lagging = fleet(split_rps=1.0, replicas=(2, 0, 1, 1))  # the engines: 1 request/s finished
    hist = tuple((le, 6.0 if le >= 2000 else 0.0) for le in BUCKETS)
    arrivals = replace(
        PoolObservation.empty(), requests_per_s=6.0, mean_prompt_tokens=2000.0, prompt_tokens_buckets=hist
    )
    seen = replace(lagging, arrivals=arrivals)
    got = observe_total(SPEC, seen)
    assert (got.rate, got.isl, got.hists, got.source) == (6.0, 2000.0, [hist], "router")
    engines = decide(SPEC, lagging, PlannerState(), 30.0)
    router = decide(SPEC, seen, PlannerState(), 30.0)
    assert (engines.signals["demandSource"], router.signals["demandSource"]) == ("pools", "router")
    running = {"prefill-mi300x": 2, "prefill-h100": 0}

    def prefill(d: Decision) -> int:
        return sum(running[p] if d.replicas[p] is None else d.replicas[p] or 0 for p in running)

    assert prefill(router) > prefill(engines)
    # an unusable reading (negative, NaN, no mean while requests came, a failed query): the engines'
    for bad in (
        replace(arrivals, requests_per_s=-1.0),
        replace(arrivals, requests_per_s=math.nan),
        replace(arrivals, mean_prompt_tokens=None),
        replace(arrivals, complete=False),
    ):
        assert observe_total(SPEC, replace(lagging, arrivals=bad)) == observe_total(SPEC, lagging)
    # a router that, over the SLO window, counts far fewer requests than the engines finish is
    # bypassed (a Gateway API inference gateway routes to the pods): its count is no demand
    quiet = replace(arrivals, requests_per_s=0.0, mean_prompt_tokens=None, prompt_tokens_buckets=None)
    assert observe_total(SPEC, replace(lagging, arrivals=quiet), bypassed=True) == observe_total(
        SPEC, lagging
    )
    busy = fleet(split_rps=6.0, replicas=(4, 0, 1, 1))
    alone, unseen = PlannerState(), PlannerState()
    for i in range(1, 80):  # long after any window: the engines' count stands, never 0
        a = decide(SPEC, busy, alone, 30.0 * i)
        b = decide(SPEC, replace(busy, arrivals=quiet), unseen, 30.0 * i)
        alone, unseen = a.state, b.state
        assert (b.replicas["prefill-mi300x"] or 4) >= 3, i
    assert b.signals["demandSource"] == "pools" and b.replicas == a.replicas
    # ... but a lull of the router's arrivals while the engines finish a queue is no bypass
    st = PlannerState()
    for i in range(1, 40):
        st = decide(
            SPEC, replace(lagging, arrivals=replace(arrivals, requests_per_s=1.0)), st, 30.0 * i
        ).state
    drained = decide(SPEC, replace(lagging, arrivals=quiet), st, 40 * 30.0)
    assert drained.signals["demandSource"] == "router"


def test_the_routers_estimated_prompt_lengths_are_scaled_to_the_engines_counts() -> None:
    """Without the model's tokenizer the router estimates tokens from bytes; over the SLO
    window the engines count the same prompts exactly, and the ratio maps the router's
    lengths (mean and histogram) onto theirs."""
    hist = tuple((le, 1.0 if le >= 1500 else 0.0) for le in BUCKETS)
    arrivals = replace(
        PoolObservation.empty(), requests_per_s=1.0, mean_prompt_tokens=1500.0, prompt_tokens_buckets=hist
    )
    obs = replace(fleet(split_rps=1.0, isl=2000.0), arrivals=arrivals)  # the engines: 2,000 tokens each
    st = PlannerState()
    for i in range(1, 40):
        st = decide(SPEC, obs, st, 30.0 * i).state
    from tandem.planner.core import prompt_scale

    scale = prompt_scale(SPEC, st)
    assert scale == pytest.approx(2000 / 1500)
    scaled = observe_total(SPEC, obs, scale)
    assert scaled.isl == pytest.approx(2000.0)
    assert next(le for le, c in scaled.hists[0] if c > 0) == pytest.approx(2000 * 2000 / 1500)
    # too few requests counted yet: no scaling
    assert prompt_scale(SPEC, PlannerState()) == 1.0
    # a wild estimate is clamped
    off = replace(obs, arrivals=replace(arrivals, mean_prompt_tokens=100.0))
    st = PlannerState()
    for i in range(1, 40):
        st = decide(SPEC, off, st, 30.0 * i).state
    assert prompt_scale(SPEC, st) == SPEC.tuning.router_scale_max


def test_the_prefill_correction_prices_the_load_the_router_sent() -> None:
    """The model's TTFT is predicted at the pool's offered load: what the router sent it
    when it is scraped, not the requests its engine finished (fewer while a queue builds,
    which would read the queueing as a slow model)."""

    def corrected(**kw: float) -> float:
        obs = fleet(split_rps=1.0, replicas=(1, 0, 1, 1), mean_ttft_s=1.0, **kw)
        return decide(SPEC, obs, PlannerState(), 30.0).state.correction["prefill-mi300x"]

    assert corrected(routed_per_s=1.8) < corrected()  # more load predicts a longer TTFT
    assert corrected(routed_per_s=1.0) == corrected()


def test_a_jump_of_the_mean_prompt_is_sized_at_once_and_noise_is_smoothed() -> None:
    """A workload that turns to long prompts is sized at the new mean in the same interval
    (fast up, as a rate is); a smaller rise is smoothed like any other reading."""

    def level_after(second_isl: float, spec: PlannerSpec = SPEC) -> float:
        st = PlannerState()
        for i in range(1, 11):
            st = decide(spec, fleet(split_rps=1.0, isl=1000.0), st, 30.0 * i).state
        st = decide(spec, fleet(split_rps=1.0, isl=second_isl), st, 330.0).state
        level = st.forecast["total.isl"].level
        assert level is not None
        return level

    assert level_after(6000.0) == pytest.approx(6000.0)
    slow = replace(SPEC, tuning=replace(SPEC.tuning, isl_jump=100.0))
    assert 1000.0 < level_after(6000.0, slow) < 4000.0  # without the restart: smoothed
    assert 1000.0 < level_after(1400.0) < 1400.0  # +40%: within the noise, smoothed


def test_a_mean_prompt_over_a_few_requests_barely_moves_the_level() -> None:
    """Three long prompts in a trickle are no workload change: the level moves by their
    share of a full sample's weight, and the jump rule waits for a mean over enough requests.
    After a silence longer than the forecast's gap, the trickle does not restart the level
    either."""

    def level_after(steps: list[tuple[float, float, float]]) -> float:
        st = PlannerState()
        for i in range(1, 11):
            st = decide(SPEC, fleet(split_rps=1.0, isl=1000.0), st, 30.0 * i).state
        for t, rps, isl in steps:
            st = decide(SPEC, fleet(split_rps=rps, isl=isl), st, t).state
        level = st.forecast["total.isl"].level
        assert level is not None
        return level

    few = 3 / 30.0  # three requests in a 30-s interval
    share = few * 30.0 / SPEC.tuning.isl_min_requests
    assert level_after([(330.0, few, 4000.0)]) == pytest.approx(1000.0 + 0.5 * share * 3000.0)
    assert level_after([(330.0, 1.0, 4000.0)]) == pytest.approx(4000.0)  # enough: a jump
    # silence (no mean prompt) for 10 intervals, then the trickle
    quiet = [(330.0 + 30.0 * i, 0.0, 0.0) for i in range(10)]
    assert level_after([*quiet, (630.0, few, 4000.0)]) < 1300.0


def test_before_burstiness_is_known_a_spent_budget_prices_the_mixed_path_dearer() -> None:
    """A service that starts under load cannot yet tell smooth arrivals from bursts, and the
    mixed model assumes smooth ones. While the error budget is spent then, mixed pools are
    sized at ``cold_mixed_factor`` times the model's service times at least (they lose most in
    a burst); with the budget fine, once arrivals were watched long enough, or when the planner
    does not choose the split threshold (disaggregation always or never), they are not."""
    obs = fleet(mixed_rps=3.0, replicas=(1, 0, 1, 2))
    spent = PlannerState(slo_met=800.0, slo_seen=1000.0)
    fine = PlannerState(slo_met=990.0, slo_seen=1000.0)
    cold = decide(TUNED, obs, spent, 30.0)
    calm = decide(TUNED, obs, fine, 30.0)
    assert cold.signals["coldMixedFactor"] == "2" and "coldMixedFactor" not in calm.signals
    assert (
        cold.signals["mixed-mi300x.correction"] == calm.signals["mixed-mi300x.correction"]
    )  # learned: the same
    assert float(cold.signals["mixed-mi300x.capacityRps"]) < 0.75 * float(
        calm.signals["mixed-mi300x.capacityRps"]
    )
    # prefill and decode pools are priced as before
    for pool in ("prefill-mi300x", "decode-mi300x"):
        assert cold.signals[f"{pool}.capacityRps"] == calm.signals[f"{pool}.capacityRps"]
    # arrivals watched for ``burst_min_intervals`` intervals: told, so the model's own price
    watched = replace(spent, arrivals=[(30.0 * i, 3.0) for i in range(TUNED.tuning.burst_min_intervals)])
    told = decide(TUNED, obs, watched, 30.0 * TUNED.tuning.burst_min_intervals)
    assert "coldMixedFactor" not in told.signals
    off = replace(TUNED, tuning=replace(TUNED.tuning, cold_mixed_factor=1.0))
    assert "coldMixedFactor" not in decide(off, obs, spent, 30.0).signals
    assert "coldMixedFactor" not in decide(SPEC, obs, spent, 30.0).signals  # a fixed threshold


def test_a_service_without_a_split_path_is_not_priced_dearer_in_a_cold_start() -> None:
    """With nothing to choose between, pricing the mixed pools dearer would only start more of
    them: a mixed-only service is sized by the model alone."""
    mixed_only = replace(SPEC, pools=tuple(p for p in SPEC.pools if p.role == "mixed"))
    obs = Observation({"mixed-mi300x": fleet(mixed_rps=3.0, replicas=(1, 0, 1, 2)).pools["mixed-mi300x"]})
    spent = PlannerState(slo_met=800.0, slo_seen=1000.0)
    fine = PlannerState(slo_met=990.0, slo_seen=1000.0)
    cold, calm = decide(mixed_only, obs, spent, 30.0), decide(mixed_only, obs, fine, 30.0)
    assert "coldMixedFactor" not in cold.signals
    assert cold.signals["mixed-mi300x.capacityRps"] == calm.signals["mixed-mi300x.capacityRps"]


POOLS4 = ("prefill-mi300x", "prefill-h100", "decode-mi300x", "mixed-mi300x")


def _closed_loop(spec: PlannerSpec, rates: list[float], t0: float = 2000.0) -> list[tuple[int, ...]]:
    """Replicas after each decision, applied at once (ready at the next), on a service whose
    scale-down window was spanned at one replica per pool."""
    st = PlannerState(
        recommendations={n: [(t0 - 700, v)] for n, v in zip(POOLS4, (1, 0, 1, 1), strict=True)},
        last_good=t0 - 30,
    )
    reps, out = [1, 0, 1, 1], []
    for i, rate in enumerate(rates):
        d = decide(
            spec, fleet(split_rps=rate, replicas=(reps[0], reps[1], reps[2], reps[3])), st, t0 + 30.0 * i
        )
        st = d.state
        reps = [n if (n := d.replicas[name]) is not None else r for name, r in zip(POOLS4, reps, strict=True)]
        out.append(tuple(reps))
    return out


def test_a_forecast_that_does_not_come_true_is_not_held_for_the_whole_window() -> None:
    """Up is at once for the forecast (a ramp's trend), but the scale-down window remembers
    the fleet for the demand observed: when the ramp stops, the replicas started for its trend
    go as the forecast settles, not after the whole window (Azure: 4 B200 for a trend of
    17.8 req/s where about 10 came). ``hold_forecast`` keeps the old behaviour."""
    rates = [2.0, 4.0, 6.0, 8.0] + [8.0] * 10  # a ramp, then flat
    held = replace(SPEC, tuning=replace(SPEC.tuning, hold_forecast=True))
    new, old = _closed_loop(SPEC, rates), _closed_loop(held, rates)
    assert new[:7] == old[:7]  # the same scale-up, at once
    peak = old[3][0]
    assert all(r[0] == peak for r in old[3:])  # held for the window
    assert new[-1][0] < peak  # the trend's replicas went
    steady = decide(SPEC, fleet(split_rps=8.0, replicas=(1, 0, 1, 1)), PlannerState(), 30.0)
    assert new[-1][0] >= (steady.replicas["prefill-mi300x"] or 1)  # never below today's need


def test_with_the_budget_spent_the_window_holds_the_forecasts_fleet() -> None:
    from tandem.planner.core import _Plan, class_demand, remembered, size

    total = Total(12.0, 8.0, lengths.lognormal(2000.0), 100.0)  # forecast 12 req/s, 8 seen
    spent = PlannerState(slo_met=800.0, slo_seen=1000.0)
    fine = PlannerState(slo_met=990.0, slo_seen=1000.0)
    plan = _Plan()
    size(SPEC, class_demand(SPEC, total, 512), fine, plan)
    assert remembered(SPEC, spent, total, 512, plan) is plan
    assert remembered(SPEC, fine, replace(total, rate=8.0), 512, plan) is plan  # no forecast above
    observed = remembered(SPEC, fine, total, 512, plan)
    prefill = ("prefill-mi300x", "prefill-h100")
    assert sum(observed.targets[p] or 0 for p in prefill) < sum(plan.targets[p] or 0 for p in prefill)
