"""Scenarios for the planner's fleet-cost threshold choice, routing, whole-replica allocation,
prompt-length distributions, and the capacity model's chunked prefill."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import replace

import pytest

from tandem.perf.catalog import ACCELERATORS, get_accelerator
from tandem.perf.models import MODEL_PRESETS, get_model
from tandem.planner import Observation, PlannerState, PoolTarget, Tuning, decide
from tandem.planner.capacity import Capacity, capacity, profile
from tandem.planner.core import Total, _cheapest_combo, allocate, plan_threshold
from tandem.planner.lengths import BUCKETS, from_buckets, lognormal
from tandem.sim.fleet import SLO, FleetSpec, PoolSpec, SimConfig, simulate
from tandem.sim.policies import PoolState
from tandem.sim.trace import TraceRequest
from test_planner import SPEC, TUNED, fleet, run, target

MODEL = get_model("llama-3.1-70b", "fp8")


def test_allocate_prefers_one_cheap_replica_over_one_efficient_expensive_one() -> None:
    cheap = target("a", "prefill", "mi300x")  # $2/h
    big = target("b", "prefill", "b200")  # $5/h
    caps = {"a": Capacity(1.0, "ttft"), "b": Capacity(3.0, "ttft")}  # b: cheaper per request/s
    assert allocate(0.5, [cheap, big], caps) == ({"a": 1, "b": 0}, False)
    assert allocate(2.5, [cheap, big], caps) == ({"a": 0, "b": 1}, False)  # $5 < 3 x $2
    assert allocate(100.0, [cheap, big], caps) == ({"a": 8, "b": 8}, True)


def test_length_distribution_from_buckets_splits_rate_and_means() -> None:
    # half the prompts in (100, 200], half in (2000, 5000]
    cum = [(le, 0.0 if le < 200 else (1.0 if le < 5000 else 2.0)) for le in BUCKETS]
    dist = from_buckets(cum, None)
    assert dist is not None
    frac, above, below = dist.share(1000)
    assert frac == pytest.approx(0.5)
    assert above is not None and 2000 < above < 5000
    assert below is not None and 100 < below < 200
    assert dist.share(1)[0] == pytest.approx(1.0)
    assert dist.share(MODEL.max_model_len + 1)[0] == 0.0
    median = dist.median(low=1000)
    assert median is not None and 2000 < median < 5000
    assert from_buckets([(le, 0.0) for le in BUCKETS], 100.0) is None


def test_lognormal_fallback_keeps_the_observed_mean() -> None:
    dist = lognormal(1500.0)
    assert dist.mean() == pytest.approx(1500.0, rel=1e-6)
    median = dist.median()
    assert median is not None and median < 1500.0  # right-skewed


def test_length_points_keep_the_mass_and_mean_of_their_range() -> None:
    dist = lognormal(1200.0, 0.8)
    whole = dist.points()
    assert sum(w for _, w in whole) == pytest.approx(1.0)
    assert sum(n * w for n, w in whole) == pytest.approx(dist.mean(), rel=1e-6)
    _, above, below = dist.share(1000)
    long, short = dist.points(1000), dist.points(0, 1000)
    assert sum(n * w for n, w in long) == pytest.approx(above, rel=1e-6)
    assert sum(n * w for n, w in short) == pytest.approx(below, rel=1e-6)
    assert min(n for n, _ in long) >= 1000 * dist.scale
    assert max(n for n, _ in short) < 1000 * dist.scale
    bounded = from_buckets([(le, 0.0 if le < 200 else 1.0) for le in BUCKETS], None)
    assert bounded is not None and bounded.points(5000) == ()


def test_prefill_work_is_averaged_over_the_prompt_lengths() -> None:
    """Prefill time is convex in the prompt (attention is quadratic): log-normal prompts of
    mean 1,200 cost more per request than 1,200-token prompts (the simulator saturates a
    MI300X prefill replica ~20% below the mean's rate), and a one-point spread changes nothing."""
    tune = Tuning()
    spread = lognormal(1200.0, 0.8).points()
    for role in ("prefill", "mixed"):
        pool = target("p", role, "mi300x")
        at_mean = capacity(pool, MODEL, 1200, 150, 2.0, 0.1, 0.9, tune).rps
        averaged = capacity(pool, MODEL, 1200, 150, 2.0, 0.1, 0.9, tune, spread=spread).rps
        point = capacity(pool, MODEL, 1200, 150, 2.0, 0.1, 0.9, tune, spread=((1200.0, 1.0),)).rps
        assert averaged < 0.9 * at_mean
        assert point == pytest.approx(at_mean)


def test_a_new_threshold_waits_for_confirmation_while_the_fleet_serves_the_current_one() -> None:
    """Short prompts planned on the split path: mixed-only is a third cheaper. While the fleet
    that runs serves the current threshold, the change needs split_confirm_intervals decisions
    in a row (a crossing of two plans' costs for one interval started replicas the window
    then held); when the current plan must grow anyway, it changes at once."""
    total = Total(2.0, 2.0, lognormal(300.0, 0.8), 100.0)
    serving = {p.name: p.max_replicas for p in TUNED.pools}
    st = replace(PlannerState(), plan_threshold=1, split_threshold=1)
    first, costs = plan_threshold(TUNED, total, st, serving)
    assert first == 1 and st.plan_beaten == 1
    assert min(costs.values()) < 0.9 * costs[1]
    confirm = TUNED.tuning.split_confirm_intervals
    assert confirm > 1
    for n in range(2, confirm):  # not confirmed yet
        assert plan_threshold(TUNED, total, st, serving)[0] == 1 and st.plan_beaten == n
    last, _ = plan_threshold(TUNED, total, st, serving)
    assert last > 1 and st.plan_beaten == 0
    # the cheaper plan lost its lead for one decision: the count starts again
    st = replace(PlannerState(), plan_threshold=1, split_threshold=1)
    plan_threshold(TUNED, total, st, serving)
    plan_threshold(TUNED, Total(0.5, 0.5, lognormal(6000.0, 0.8), 100.0), st, serving)
    assert st.plan_beaten == 0 and st.plan_candidate is None
    assert plan_threshold(TUNED, total, st, serving)[0] == 1
    # nothing runs: the current plan must start replicas anyway, so it starts the right ones
    st = replace(PlannerState(), plan_threshold=1, split_threshold=1)
    assert plan_threshold(TUNED, total, st, {})[0] > 1


def test_a_threshold_cheaper_only_at_the_held_peak_does_not_start_replicas_in_a_lull() -> None:
    """The held demand is the window's peak (12 req/s), where a partial split is cheaper;
    today's 1.5 req/s is served by the mixed replicas that run, and costs more split. The
    planner keeps the threshold: switching would start prefill replicas beside the mixed ones
    the window holds anyway (synthetic-bursts: they ran ~10 minutes after each burst and
    served nothing)."""
    nothing = TUNED.model.max_model_len + 1
    peak = Total(12.0, 12.0, lognormal(1200.0, 0.8), 150.0)
    lull = Total(1.5, 1.5, lognormal(1200.0, 0.8), 150.0)
    running = {"mixed-mi300x": 5, "decode-mi300x": 1, "prefill-mi300x": 0, "prefill-h100": 0}
    st = replace(PlannerState(), plan_threshold=nothing, split_threshold=nothing)
    for _ in range(3):
        threshold, costs = plan_threshold(TUNED, peak, st, running, lull)
        assert threshold == nothing and st.plan_beaten == 0
    assert min(costs.values()) < 0.9 * costs[nothing]  # the split is cheaper at the peak
    # sustained (today's demand is the peak): it is adopted once confirmed
    st = replace(PlannerState(), plan_threshold=nothing, split_threshold=nothing)
    for _ in range(TUNED.tuning.split_confirm_intervals - 1):
        assert plan_threshold(TUNED, peak, st, running, peak)[0] == nothing
    assert plan_threshold(TUNED, peak, st, running, peak)[0] < nothing
    # what runs cannot serve today's demand at the current threshold: no reason to wait
    st = replace(PlannerState(), plan_threshold=nothing, split_threshold=nothing)
    assert plan_threshold(TUNED, peak, st, {}, lull)[0] < nothing


def test_two_different_thresholds_winning_in_turn_confirm_neither() -> None:
    """The count is per threshold: one that wins a decision after another one won the previous
    has won once (found by review: "split nothing" won at 2 req/s, then a partial split at
    6 req/s was adopted at once)."""
    serving = {p.name: p.max_replicas for p in TUNED.pools}
    st = replace(PlannerState(), plan_threshold=4096, split_threshold=4096)
    first, costs = plan_threshold(TUNED, Total(2.0, 2.0, lognormal(800.0, 0.8), 100.0), st, serving)
    assert first == 4096 and st.plan_beaten == 1
    leader = st.plan_candidate
    second, costs = plan_threshold(TUNED, Total(6.0, 6.0, lognormal(800.0, 0.8), 100.0), st, serving)
    assert min(costs.values()) < 0.9 * costs[4096]  # another threshold is cheaper again ...
    assert st.plan_candidate != leader  # ... but not the same one
    assert second == 4096 and st.plan_beaten == 1
    # the state keeps the count across decisions (it lives in an annotation)
    again = PlannerState.from_json(st.to_json())
    assert (again.plan_candidate, again.plan_beaten) == (st.plan_candidate, 1)


def test_a_hold_on_bad_data_restarts_the_confirmation() -> None:
    state = replace(PlannerState(), plan_threshold=1, split_threshold=1, plan_candidate=5000, plan_beaten=1)
    held = decide(TUNED, Observation({}), state, 30.0)
    assert held.state.plan_beaten == 0 and held.state.plan_candidate is None


def test_short_prompts_on_few_replicas_plan_no_split_path() -> None:
    """Mixed and decode pools are paid for (min 1); a trickle of long prompts costs less on
    the mixed pool than on a new prefill replica: the planner splits nothing."""
    confirm = TUNED.tuning.split_confirm_intervals
    steps = [
        (30.0 * i, fleet(split_rps=0.3, mixed_rps=0.5, replicas=(1, 0, 1, 1))) for i in range(1, confirm + 2)
    ]
    d = run(steps, TUNED)
    assert d.signals["split.plannedRps"] == "0"  # no prompt is planned on the split path
    assert d.signals["prefill-mi300x.recommended"] == "0"
    assert d.replicas["prefill-h100"] is None


def test_plan_threshold_holds_through_a_lull() -> None:
    """The threshold is chosen for the demand held over the scale-down window, so a quiet
    interval after a burst does not re-plan the fleet (and the router keeps its paths)."""
    busy = fleet(split_rps=4.0, replicas=(4, 0, 1, 1))
    quiet = fleet(split_rps=0.0, replicas=(4, 0, 1, 1))
    d_busy = run([(30.0, busy)], TUNED)
    d = decide(TUNED, quiet, d_busy.state, 60.0)
    assert d.signals["plannedSplitThreshold"] == d_busy.signals["plannedSplitThreshold"]
    assert d.reason == "StabilisingScaleDown"


def test_router_spills_to_ready_capacity_while_the_planned_path_starts() -> None:
    """Planned all-mixed but only the split path has ready replicas to spare: the router
    threshold sends long prompts there until the mixed replicas are up."""
    state = replace(
        PlannerState(), plan_threshold=MODEL.max_model_len + 1, split_threshold=MODEL.max_model_len + 1
    )
    obs = fleet(split_rps=0.0, mixed_rps=6.0, replicas=(3, 0, 1, 3), starting=(0, 0, 0, 2))
    d = decide(TUNED, obs, state, 30.0)
    assert d.split_threshold is not None and d.split_threshold <= 1000


def test_low_latency_never_raises_the_correction() -> None:
    """A sample far inside the SLO (here 0.5 s TTFT for a 2 s target) may say the model is
    pessimistic, never that capacity must shrink (at light load the ratio is noise)."""
    slowish = fleet(split_rps=1.0, replicas=(2, 0, 1, 1), mean_ttft_s=0.5)
    d = run([(30.0 * i, slowish) for i in range(1, 6)])
    assert d.state.correction.get("prefill-mi300x", 1.0) <= 1.0


def test_chunked_prefill_of_long_prompts_costs_quadratic_attention_on_mixed_pools() -> None:
    tune = Tuning()
    mixed = target("m", "mixed", "mi300x")
    prefill = target("p", "prefill", "mi300x")
    short_m = capacity(mixed, MODEL, 1000, 100, 2.0, 0.1, 0.9, tune).rps
    long_m = capacity(mixed, MODEL, 6000, 60, 2.0, 0.1, 0.9, tune).rps
    long_p = capacity(prefill, MODEL, 6000, 60, 2.0, 0.1, 0.9, tune).rps
    assert long_m < short_m / 6  # more than linear in the prompt
    assert long_m <= long_p * 1.1  # no cheaper than a prefill replica for long prompts
    # the median sets the latency: a heavy tail with the same mean is easier to serve
    assert capacity(prefill, MODEL, 6000, 60, 2.0, 0.1, 0.9, tune, typical=4000).rps > long_p


def test_simulator_reports_prompt_length_histograms() -> None:
    seen: list[Mapping[str, PoolState]] = []

    class Spy:
        name = "spy"

        def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
            seen.append(pools)
            return {}

    acc = get_accelerator("mi300x")
    fleet_spec = FleetSpec(MODEL, (PoolSpec("mixed", "mixed", acc, 1, 1),))
    trace = [TraceRequest(0.1 * i, 150 if i % 2 else 3000, 10) for i in range(100)]
    simulate(trace, fleet_spec, SLO(2.0, 0.1), autoscaler=Spy(), config=SimConfig(5.0, 60.0))
    buckets = seen[0]["mixed"].observation.prompt_tokens_buckets
    assert buckets is not None
    cum = dict(buckets)
    rate = seen[0]["mixed"].observation.requests_per_s
    assert rate is not None and cum[math.inf] == pytest.approx(rate)
    assert cum[200.0] == pytest.approx(rate / 2, rel=0.1)  # the 150-token half
    assert cum[100.0] == 0.0


def test_decide_uses_histograms_over_the_fallback() -> None:
    """With the histogram every 2,000-token prompt is >= the 512 threshold: all split; the
    log-normal fallback (same mean) puts its short tail on the mixed path."""
    obs = fleet(split_rps=2.0)
    no_hist = Observation(
        {k: replace(v, metrics=replace(v.metrics, prompt_tokens_buckets=None)) for k, v in obs.pools.items()}
    )
    a = decide(SPEC, obs, PlannerState(), 30.0)
    b = decide(SPEC, no_hist, PlannerState(), 30.0)
    assert float(a.signals["split.rps"]) == pytest.approx(2.0)
    assert 1.0 < float(b.signals["split.rps"]) < 2.0


@pytest.mark.parametrize("model", sorted(MODEL_PRESETS))
def test_decode_step_is_a_decode_only_iteration(model: str) -> None:
    """``PerfProfile.decode_step`` writes out ``iteration(0, 0.0, batch, context)`` for speed: it
    must agree with it bit for bit."""
    rng = random.Random(model)
    for acc in ACCELERATORS.values():
        for tp in (1, 8):
            prof = profile(acc, MODEL_PRESETS[model], tp)
            for _ in range(50):
                b, c = rng.randint(1, 512), rng.randint(0, 2_000_000)
                assert prof.decode_step(b, c) == prof.iteration(0, 0.0, b, c)


def test_cheapest_combo_matches_the_exhaustive_search() -> None:
    """Solving for the widest pool gives what trying every combination gives (least cost,
    then most capacity, then the first combination), with ties and free pools."""

    def exhaustive(
        rate: float, prices: list[float], rps: list[float], ranges: list[int]
    ) -> tuple[int, ...] | None:
        best: tuple[float, float, tuple[int, ...]] | None = None
        for combo in itertools.product(*(range(r + 1) for r in ranges)):
            cap = sum(n * c for n, c in zip(combo, rps, strict=True))
            if cap < rate - 1e-9:
                continue
            key = (sum(n * p for n, p in zip(combo, prices, strict=True)), -cap, combo)
            best = key if best is None or key < best else best
        return None if best is None else best[2]

    rng = random.Random(5)
    acc = get_accelerator("h100")
    for _ in range(3000):
        k = rng.randint(1, 3)
        prices = [rng.choice([0.0, 1.0, 2.0, 2.5, 5.0, rng.uniform(0.1, 6.0)]) for _ in range(k)]
        rps = [rng.choice([0.5, 1.0, 1.5, 3.0, rng.uniform(0.01, 5.0)]) for _ in range(k)]
        ranges = [rng.randint(0, 12) for _ in range(k)]
        rate = rng.choice([0.5, 1.0, 3.0, rng.uniform(0.0, 25.0)])
        pools = [PoolTarget(f"p{i}", "prefill", acc, 1, 0, 99, prices[i]) for i in range(k)]
        caps = {p.name: Capacity(c, "ttft") for p, c in zip(pools, rps, strict=True)}
        assert _cheapest_combo(rate, pools, caps, ranges) == exhaustive(rate, prices, rps, ranges)


def test_the_router_threshold_dwells_before_moving_again() -> None:
    """After the router's threshold moved, it stays for route_dwell_intervals (the metrics
    window still mixes the old routing); then it may move back."""
    state = replace(
        PlannerState(), plan_threshold=MODEL.max_model_len + 1, split_threshold=MODEL.max_model_len + 1
    )
    spill = fleet(split_rps=0.0, mixed_rps=6.0, replicas=(3, 0, 1, 3), starting=(0, 0, 0, 2))
    first = decide(TUNED, spill, state, 30.0)
    assert first.split_threshold is not None and first.split_threshold <= 1000
    calm = fleet(split_rps=0.0, mixed_rps=0.5, replicas=(3, 0, 1, 3))
    soon = decide(TUNED, calm, first.state, 60.0)  # one interval later: held
    assert soon.split_threshold is None and soon.state.split_threshold == first.split_threshold
    later = decide(TUNED, calm, soon.state, 30.0 + 3 * TUNED.interval_s)  # the dwell has passed
    assert later.split_threshold is not None and later.split_threshold != first.split_threshold
