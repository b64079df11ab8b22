"""The planner across pools of one role: keeping what runs, holding the role's peak capacity
(not each pool's), and the SLO's error budget that decides between the two."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from tests.test_planner import MODEL, fleet, metrics, reading, target
from tests.test_planner import SPEC as FOUR  # prefill-mi300x, prefill-h100, decode-mi300x, mixed-mi300x

from tandem.planner import Observation, PlannerSpec, PlannerState, PoolReading, decide, lengths
from tandem.planner.core import (
    _keep_decode_for_prefill,
    _make_before_break,
    _Plan,
    _unused_and_idle,
    budget_spent,
    longest_reachable_prompt,
    unreachable_share,
    update_budget,
    within,
)
from tandem.planner.types import Tuning

# One prefill pool, two decode pools of nearly the same price: Gaudi 3 a little cheaper, an
# MI300X replica a little bigger.
SPEC = PlannerSpec(
    model=MODEL,
    pools=(
        target("prefill-mi300x", "prefill", "mi300x", lo=1),
        target("decode-mi300x", "decode", "mi300x"),
        target("decode-gaudi3", "decode", "gaudi3"),
    ),
    ttft_s=2.0,
    itl_s=0.1,
    interval_s=30.0,
    tune_split=False,
)
TTFT_OK = ((1.0, 1.0), (2.5, 1.0), (math.inf, 1.0))  # every first token within 1 s, 1/s
TTFT_LATE = ((1.0, 0.0), (2.5, 0.0), (math.inf, 1.0))  # every one later than 2.5 s


def observe(
    decode: tuple[int, int], rps: float = 0.5, ttft: tuple[tuple[float, float], ...] = TTFT_OK
) -> Observation:
    mi, ga = decode
    return Observation(
        {
            "prefill-mi300x": PoolReading(1, 1, 0, metrics(rps, 2000, 1, ttft_buckets=ttft)),  # type: ignore[arg-type]
            "decode-mi300x": PoolReading(mi, mi, 0, metrics(0.0, 2000, 100, running=rps * 3)),
            "decode-gaudi3": PoolReading(ga, ga, 0, metrics(0.0, 2000, 100, running=rps * 3)),
        }
    )


def test_within_reads_the_share_under_the_target_like_histogram_quantile() -> None:
    buckets = ((1.0, 2.0), (2.5, 5.0), (math.inf, 6.0))
    met, total = within(buckets, 2.0)  # type: ignore[misc]
    assert total == 6.0 and met == pytest.approx(2.0 + 3.0 * (1.0 / 1.5))
    assert within(buckets, 0.5) == (1.0, 6.0)  # linear from 0 inside the first bucket
    assert within(buckets, 100.0) == (5.0, 6.0)  # beyond the last finite bound: only what is known
    assert within(((1.0, 0.0), (math.inf, 0.0)), 2.0) is None  # nothing seen
    assert within((), 2.0) is None


def test_the_budget_is_spent_only_below_the_target_and_with_enough_requests() -> None:
    st = PlannerState()
    update_budget(SPEC, observe((1, 0), ttft=TTFT_LATE), st, 30.0)
    assert st.slo_seen == pytest.approx(30.0) and st.slo_met == 0.0
    assert not budget_spent(SPEC, st)  # 30 first tokens: fewer than slo_min_requests
    update_budget(SPEC, observe((1, 0), ttft=TTFT_LATE), st, 60.0)
    assert budget_spent(SPEC, st)
    for i in range(3, 40):  # good intervals outweigh the bad ones as they decay
        update_budget(SPEC, observe((1, 0)), st, 30.0 * i)
    assert not budget_spent(SPEC, st) and st.slo_met / st.slo_seen > 0.9


def test_prompts_no_pool_can_prefill_in_time_spend_no_error_budget() -> None:
    """A prompt too long for any entry pool to prefill within the TTFT target, even alone,
    misses whatever the fleet: such misses must not hold or add replicas."""
    longest = longest_reachable_prompt(SPEC, PlannerState())
    assert 1000 < longest < 100_000  # a 70B fp8 prompt on one MI300X: thousands of tokens in 2 s
    # a quarter of the prompts are (log-uniformly) 2x to 4x too long; the rest 1x to 2x shorter
    cut = float(longest)
    dist = lengths.from_buckets([(cut / 2, 0.0), (cut, 0.75), (4 * cut, 1.0)], None)
    assert dist is not None
    assert unreachable_share(SPEC, PlannerState(), dist) == pytest.approx(0.25, abs=0.01)
    # a slower model (correction above 1) does not call more prompts unreachable
    slow = PlannerState(correction={"prefill-mi300x": 3.0})
    assert longest_reachable_prompt(SPEC, slow) == longest
    # 22% of first tokens late, all of them the unreachable prompts: the budget is not spent
    st = PlannerState()
    ttft = ((1.0, 0.78), (2.5, 0.78), (math.inf, 1.0))
    for i in range(1, 6):
        update_budget(SPEC, observe((1, 0), rps=1.0, ttft=ttft), st, 30.0 * i, unreachable=0.25)
    assert st.slo_unreachable / st.slo_seen == pytest.approx(0.22)  # at most the misses
    assert not budget_spent(SPEC, st)
    # counted as ordinary misses, the same first tokens spend it
    ordinary = PlannerState()
    for i in range(1, 6):
        update_budget(SPEC, observe((1, 0), rps=1.0, ttft=ttft), ordinary, 30.0 * i)
    assert budget_spent(SPEC, ordinary)
    # an unreachable share larger than the misses leaves no negative miss share
    st.slo_unreachable = st.slo_seen
    assert not budget_spent(SPEC, st)
    decided = decide(SPEC, observe((1, 0), rps=1.0, ttft=ttft), PlannerState(), 30.0)
    assert float(decided.signals["ttftOutOfReach"]) < 0.01  # prompts of mean 2,000 tokens: within reach
    assert "no pool prefills" not in decided.message
    # prompts of 2x the longest reachable: the decision says so, in words a person reads
    far = observe((1, 0), rps=1.0, ttft=ttft)
    long_prompts = metrics(1.0, 2 * cut, 1, ttft_buckets=ttft)
    far = Observation({**far.pools, "prefill-mi300x": PoolReading(1, 1, 0, long_prompts)})
    told = decide(SPEC, far, PlannerState(), 30.0)
    assert f"100% of prompts are longer than {longest} tokens" in told.message, told.message
    assert float(told.signals["ttftOutOfReach"]) == pytest.approx(0.22)  # capped at the misses


def test_the_budget_counts_the_routers_first_tokens_when_it_reports_them() -> None:
    """The prefill engine's TTFT ends before the KV hand-off and the decode replica's first
    token; the router sees what clients see. Its histogram wins when it has any, and the
    engines' count again when it has none (not scraped, or no streaming request)."""
    engines_fine = observe((1, 0))  # the prefill engine: every first token within 1 s
    clients_late = replace(engines_fine, client_ttft_buckets=TTFT_LATE)
    st = PlannerState()
    update_budget(SPEC, clients_late, st, 30.0)
    assert st.slo_seen == pytest.approx(30.0) and st.slo_met == 0.0
    decided = decide(SPEC, clients_late, PlannerState(), 30.0).signals
    assert decided["errorBudgetSource"] == "router" and decided["ttftWithinTarget"] == "0"
    silent = replace(engines_fine, client_ttft_buckets=((1.0, 0.0), (math.inf, 0.0)))
    st = PlannerState()
    update_budget(SPEC, silent, st, 30.0)
    assert st.slo_met == pytest.approx(30.0)  # the engines' count
    assert decide(SPEC, silent, PlannerState(), 30.0).signals["errorBudgetSource"] == "pools"


def test_replicas_that_run_are_kept_over_a_slightly_cheaper_pool() -> None:
    d = decide(SPEC, observe((1, 0)), PlannerState(), 30.0)
    assert d.replicas["decode-gaudi3"] is None and d.replicas["decode-mi300x"] is None
    strict = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))
    d = decide(strict, observe((1, 0)), PlannerState(), 30.0)
    assert d.replicas["decode-gaudi3"] == 1  # the cheapest fleet, started...
    assert d.replicas["decode-mi300x"] is None  # ...while the running replica stays (it goes up)


def test_a_scale_up_adds_to_the_replicas_that_run_rather_than_replacing_them() -> None:
    """16 req/s outgrow the running MI300X decode replica. Two Gaudi 3 would be the cheapest
    fleet, but they serve only after they start, and the window would hold the MI300X replica
    meanwhile: within ``pool_hysteresis`` the planner keeps it and adds one Gaudi 3."""
    d = decide(SPEC, observe((1, 0), rps=16.0), PlannerState(), 30.0)
    assert d.signals["decode-mi300x.recommended"] == "1" and d.replicas["decode-gaudi3"] == 1
    strict = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))
    d = decide(strict, observe((1, 0), rps=16.0), PlannerState(), 30.0)
    assert d.signals["decode-mi300x.recommended"] == "0" and d.replicas["decode-gaudi3"] == 2


def _peak_then_lull(spec: PlannerSpec, now: float) -> PlannerState:
    """A state whose window saw one MI300X decode replica recommended (a burst), then one Gaudi 3
    (the lull), and which spans the whole window."""
    window = spec.tuning.down_window_s
    st = PlannerState()
    st.recommendations = {
        "prefill-mi300x": [(now - window - 30, 1), (now - 300, 1), (now - 60, 1)],
        "decode-mi300x": [(now - window - 30, 0), (now - 300, 1), (now - 60, 0)],
        "decode-gaudi3": [(now - window - 30, 1), (now - 300, 0), (now - 60, 1)],
    }
    # within the target, but most of the error budget spent: the whole window holds
    st.slo_met, st.slo_seen = 930.0, 1000.0
    st.last_good = now - 30
    return st


def test_a_role_holds_its_peak_capacity_until_it_leaves_the_window() -> None:
    spec = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))  # the lull asks for Gaudi 3
    now = 2000.0
    st = _peak_then_lull(spec, now)
    d = decide(spec, observe((1, 1)), st, now)
    # Gaudi 3 alone is less than the peak's one MI300X: both stay while the peak is in the window
    assert d.replicas["decode-mi300x"] is None and d.replicas["decode-gaudi3"] is None
    assert d.reason == "StabilisingScaleDown"
    for step in range(1, 12):  # every interval, until the peak (300 s ago) leaves the window
        d = decide(spec, observe((1, 1)), d.state, now + 30.0 * step)
        if d.replicas["decode-mi300x"] is not None:
            break
    assert d.replicas["decode-mi300x"] == 0 and d.replicas["decode-gaudi3"] is None
    assert now + 30.0 * step - (now - 300) >= spec.tuning.down_window_s


def _two_peaks(spec: PlannerSpec, now: float, met: float) -> PlannerState:
    """The window saw two MI300X (one burst), later two Gaudi 3 (another), now one Gaudi 3."""
    st = _peak_then_lull(spec, now)
    st.recommendations["prefill-mi300x"] = [(now - 700, 1), (now - 400, 1), (now - 200, 1), (now - 60, 1)]
    st.recommendations["decode-mi300x"] = [(now - 700, 0), (now - 400, 2), (now - 200, 0), (now - 60, 0)]
    st.recommendations["decode-gaudi3"] = [(now - 700, 1), (now - 400, 0), (now - 200, 2), (now - 60, 1)]
    st.slo_met = met
    return st


def test_the_role_keeps_the_cheapest_replicas_holding_its_peak_not_every_pools_peak() -> None:
    spec = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))
    now = 2000.0
    caps = decide(spec, observe((2, 2)), PlannerState(), 30.0).signals
    mi, ga = float(caps["decode-mi300x.capacityRps"]), float(caps["decode-gaudi3.capacityRps"])
    assert mi + 2 * ga >= 2 * mi > 2 * ga  # 1 MI300X + 2 Gaudi 3 hold the peak; 2 Gaudi 3 do not
    d = decide(spec, observe((2, 2)), _two_peaks(spec, now, met=930.0), now)
    assert d.replicas["decode-mi300x"] == 1 and d.replicas["decode-gaudi3"] is None


def test_with_the_budget_spent_every_pool_keeps_its_own_peak() -> None:
    spec = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))
    now = 2000.0
    d = decide(spec, observe((2, 2)), _two_peaks(spec, now, met=500.0), now)  # half the first tokens late
    assert d.replicas["decode-mi300x"] is None and d.replicas["decode-gaudi3"] is None
    assert d.reason == "StabilisingScaleDown"
    assert d.signals["errorBudget"] == "spent" and 0.5 < float(d.signals["ttftWithinTarget"]) < 0.55
    fresh = decide(spec, observe((2, 2)), PlannerState(), now)
    assert fresh.signals["errorBudget"] == "unknown"  # 30 first tokens are too few to tell


def test_no_replica_leaves_a_role_while_another_pool_of_it_goes_up() -> None:
    spec = replace(SPEC, tuning=replace(Tuning(), pool_hysteresis=0.0))
    now = 2000.0
    st = _peak_then_lull(spec, now)
    st.recommendations["decode-mi300x"] = [(now - 700, 0), (now - 60, 0)]
    d = decide(spec, observe((1, 0)), st, now)  # the lull asks for Gaudi 3, MI300X runs
    assert d.replicas["decode-gaudi3"] == 1
    assert d.replicas["decode-mi300x"] is None  # stays until Gaudi 3 serves


def test_when_the_budget_stops_the_new_pool_the_old_one_still_scales_down() -> None:
    # an expensive pool runs 4 replicas; the cheaper one would take over but the cost cap
    # cuts its start: the expensive pool must still come down after the window
    spec = replace(
        SPEC,
        pools=(
            target("prefill-mi300x", "prefill", "mi300x", lo=1),
            replace(target("decode-mi300x", "decode", "mi300x"), price_per_hour=10.0),
            target("decode-gaudi3", "decode", "gaudi3"),
        ),
        max_cost_per_hour=2.0 + 4 * 10.0 + 1.0,
    )
    now = 2000.0
    st = PlannerState()
    st.recommendations = {
        "prefill-mi300x": [(now - 700, 1), (now - 60, 1)],
        "decode-mi300x": [(now - 700, 1), (now - 60, 1)],
        "decode-gaudi3": [(now - 700, 0), (now - 60, 0)],
    }
    st.last_good = now - 30
    d = decide(spec, observe((4, 0)), st, now)
    assert d.limited_by == "budget" and d.replicas["decode-gaudi3"] is None
    assert d.replicas["decode-mi300x"] is not None and d.replicas["decode-mi300x"] < 4


def test_a_zero_scale_down_window_never_fails() -> None:
    spec = replace(SPEC, tuning=replace(Tuning(), down_window_s=0.0))
    st = PlannerState()
    for i in range(1, 5):
        d = decide(spec, observe((3, 0), rps=0.2 if i > 1 else 3.0), st, 30.0 * i)
        st = d.state
    assert d.reason in ("ScaledDown", "Steady", "Rebalanced")


def test_the_new_state_round_trips_through_json() -> None:
    st = _peak_then_lull(SPEC, 2000.0)
    st.idle_since = {"mixed": 1940.0}
    st.slo_unreachable = 42.5
    st.prompt_counts = {"router": [9.0e5, 500.0], "engines": [1.1e6, 498.0]}
    back = PlannerState.from_json(st.to_json())
    assert back.recommendations == st.recommendations and (back.slo_met, back.slo_seen) == (930.0, 1000.0)
    assert back.idle_since == {"mixed": 1940.0} and back.slo_unreachable == 42.5
    assert back.prompt_counts == st.prompt_counts
    assert PlannerState.from_json('{"role_units": {"decode": [[1, 2]]}}') == PlannerState()


def test_a_dipping_histogram_never_reads_above_all() -> None:
    met, total = within(((1.0, 5.0), (2.5, 5.2), (math.inf, 4.9)), 2.0)  # type: ignore[misc]
    assert met <= total == 5.2


def test_a_prefill_plan_keeps_a_decode_replica_on_a_pool_that_may_run_one() -> None:
    """Prefill needs somewhere to send its KV: the cheapest decode pool whose max allows a
    replica gets one (a cheaper pool capped at 0 used to be asked, and the clamp left none)."""
    spec = replace(
        SPEC,
        pools=(
            target("prefill-mi300x", "prefill", "mi300x"),
            target("decode-gaudi3", "decode", "gaudi3", hi=0),
            target("decode-mi300x", "decode", "mi300x"),
        ),
    )
    plan = _Plan(targets={"prefill-mi300x": 2, "decode-gaudi3": 0, "decode-mi300x": 0})
    _keep_decode_for_prefill(spec, plan)
    assert plan.targets == {"prefill-mi300x": 2, "decode-gaudi3": 0, "decode-mi300x": 1}


def test_a_path_switch_keeps_the_old_paths_replicas_until_the_new_ones_serve() -> None:
    """Make before break across paths: split-path pools do not go down while a mixed pool
    goes up or starts (and the other way round); within one path nothing is held."""
    obs = fleet(replicas=(2, 0, 1, 1))
    plan = _Plan()
    out: dict[str, int | None] = {
        "prefill-mi300x": 0,
        "prefill-h100": None,
        "decode-mi300x": 0,
        "mixed-mi300x": 3,
    }
    _make_before_break(FOUR, obs, plan, out)
    assert out == {"prefill-mi300x": None, "prefill-h100": None, "decode-mi300x": None, "mixed-mi300x": 3}
    assert plan.held == {"prefill-mi300x": "moving-in", "decode-mi300x": "moving-in"}
    # a mixed replica still starting holds the split path too; once nothing moves in, nothing
    # is held
    starting = fleet(replicas=(2, 0, 1, 3), starting=(0, 0, 0, 2))
    out = {"prefill-mi300x": 1, "prefill-h100": None, "decode-mi300x": None, "mixed-mi300x": None}
    _make_before_break(FOUR, starting, _Plan(), out)
    assert out["prefill-mi300x"] is None
    out = {"prefill-mi300x": 1, "prefill-h100": None, "decode-mi300x": None, "mixed-mi300x": None}
    _make_before_break(FOUR, obs, _Plan(), out)
    assert out["prefill-mi300x"] == 1
    # within the split path: decode up, prefill down is not a path switch
    out = {"prefill-mi300x": 1, "prefill-h100": None, "decode-mi300x": 2, "mixed-mi300x": None}
    _make_before_break(FOUR, obs, _Plan(), out)
    assert out == {"prefill-mi300x": 1, "prefill-h100": None, "decode-mi300x": 2, "mixed-mi300x": None}
    # with one path only (this module's SPEC), nothing is ever held
    single = observe((2, 0))
    out = {"prefill-mi300x": None, "decode-mi300x": 1, "decode-gaudi3": 1}
    _make_before_break(SPEC, single, _Plan(), out)
    assert out == {"prefill-mi300x": None, "decode-mi300x": 1, "decode-gaudi3": 1}


def _split_only(
    now: float, split_rps: float, mixed: int = 4, tokens: bool = True
) -> tuple[Observation, PlannerState]:
    """FOUR with every prompt on the split path (2,000 tokens, threshold 512) and ``mixed``
    mixed replicas that the router sends nothing, left from a peak 100 s ago that asked
    for them; ``tokens=False``: the mixed pool's token rates are unknown."""
    idle = metrics(0.0, 200, 100)
    if not tokens:
        idle = replace(idle, prompt_tokens_per_s=None, generation_tokens_per_s=None)
    obs = Observation(
        {
            "prefill-mi300x": reading(2, metrics(split_rps, 2000, 1, ttft_buckets=TTFT_OK)),
            "prefill-h100": reading(0),
            "decode-mi300x": reading(
                1, replace(metrics(0.0, 2000, 100), generation_tokens_per_s=split_rps * 100)
            ),
            "mixed-mi300x": reading(mixed, idle),
        }
    )
    st = PlannerState()
    st.recommendations = {
        "prefill-mi300x": [(now - 700, 2), (now - 100, 2)],
        "prefill-h100": [(now - 700, 0), (now - 100, 0)],
        "decode-mi300x": [(now - 700, 1), (now - 100, 1)],
        "mixed-mi300x": [(now - 700, 1), (now - 100, mixed)],
    }
    st.slo_met, st.slo_seen = 990.0, 1000.0
    st.last_good = now - 30
    return obs, st


def _mixed_over(
    obs: Observation, st: PlannerState, now: float, steps: int, spec: PlannerSpec = FOUR
) -> list[tuple[str, int | None]]:
    out = []
    for i in range(steps):
        d = decide(spec, obs, st, now + 30.0 * i)
        st = d.state
        out.append((d.reason, d.replicas["mixed-mi300x"]))
    return out


def test_a_path_the_plan_no_longer_uses_goes_down_once_idle_without_the_window() -> None:
    """Mixed replicas the router sends nothing (not even spill) while the split path serves,
    and that no class of the plan uses, go to their recommendation (the pool's min) once idle
    for ``idle_release_s``, not at the end of the scale-down window."""
    now = 2000.0
    obs, st = _split_only(now, split_rps=0.5)
    assert FOUR.tuning.idle_release_s == 60.0
    steps = _mixed_over(obs, st, now, 4)
    # idle seen at +0 s; held at +30 s; released at +60 s
    assert steps[:2] == [("StabilisingScaleDown", None), ("StabilisingScaleDown", None)]
    assert steps[2] == ("ScaledDown", 1)
    d = decide(FOUR, obs, decide(FOUR, obs, st, now).state, now + 30.0)
    assert d.signals["mixed.idleSeconds"] == "30" and "decode.idleSeconds" not in d.signals
    # without the rule the window (halved: the budget is spare) holds them 200 s longer
    slow = replace(FOUR, tuning=replace(FOUR.tuning, idle_release_s=math.inf))
    assert all(n is None for _, n in _mixed_over(obs, st, now, 6, slow))


def test_an_idle_path_is_held_while_the_whole_service_is_idle_or_its_rate_unknown() -> None:
    """A lull is not a path the router left (the Azure trace's silences), and a rate that is
    not known tells nothing: the window holds the mixed replicas in both cases."""
    now = 2000.0
    for obs, st in (_split_only(now, split_rps=0.0), _split_only(now, split_rps=0.5, tokens=False)):
        steps = _mixed_over(obs, st, now, 6)
        assert all(n is None for _, n in steps), steps
        assert "mixed.idleSeconds" not in decide(FOUR, obs, st, now).signals


def test_an_idle_role_the_plan_still_uses_keeps_the_window() -> None:
    plan = _Plan(unused={"mixed"})
    st = PlannerState(idle_since={"mixed": 100.0, "decode": 100.0})
    assert _unused_and_idle(FOUR, "mixed", st, 160.0, plan)
    assert not _unused_and_idle(FOUR, "mixed", st, 159.0, plan)  # not idle long enough
    assert not _unused_and_idle(FOUR, "decode", st, 500.0, plan)  # the plan sends it demand
    assert not _unused_and_idle(FOUR, "prefill", st, 500.0, plan)  # not idle


def test_idleness_seen_before_a_gap_in_the_metrics_does_not_count() -> None:
    now = 2000.0
    obs, st = _split_only(now, split_rps=0.5)
    st.idle_since = {"mixed": now - 600.0}
    st.last_good = now - 300.0  # nothing good for 10 intervals: the windows start again
    d = decide(FOUR, obs, st, now)
    assert d.replicas["mixed-mi300x"] is None and d.state.idle_since == {"mixed": now}
