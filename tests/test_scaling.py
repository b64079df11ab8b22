"""The planner's results as the reconcile's input (tandem.scaling) and the planner override of
base_replicas: pure, no cluster, no Prometheus."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tandem import names
from tandem.models import InferenceServiceSpec, InferenceServiceStatus
from tandem.models.common import Condition
from tandem.models.inference_service import Decision as DecisionStatus
from tandem.models.inference_service import PoolStatus
from tandem.planner import (
    Decision,
    PlannerState,
    PoolObservation,
    Tuning,
    base_replicas,
    decide,
    planner_spec,
)
from tandem.planner.types import CLIENT
from tandem.scaling import (
    METRICS_AVAILABLE,
    PROMETHEUS_UNAVAILABLE,
    RECOMMEND_NOTE,
    SCALING_LIMITED,
    Autoscale,
    after_decision,
    after_hold,
    as_recommendation,
    planner_status,
    pool_readings,
    target_ratio,
    tuning_from,
)

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:00:30Z"


def spec(mode: str = "planner") -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {
            "model": {"name": "m", "preset": "llama-3.1-8b"},
            "engine": "sim",
            "pools": [
                {"name": "p", "role": "prefill", "acceleratorPool": "b200", "replicas": {"min": 1, "max": 4}},
                {
                    "name": "d",
                    "role": "decode",
                    "acceleratorPool": "gaudi3",
                    "replicas": {"min": 1, "max": 4},
                },
                {"name": "x", "role": "mixed", "acceleratorPool": "h100", "replicas": {"min": 1, "max": 2}},
            ],
            "autoscaling": {"mode": mode, "intervalSeconds": 5},
        }
    )


def dep(replicas: int, ready: int | None = None) -> dict[str, Any]:
    return {"spec": {"replicas": replicas}, "status": {"readyReplicas": replicas if ready is None else ready}}


def decision(
    replicas: dict[str, int | None],
    reason: str = "ScaledUp",
    limited: Any = None,
    threshold: int | None = 512,
    limited_pools: tuple[str, ...] = (),
) -> Decision:
    return Decision(
        replicas=replicas,
        split_threshold=None,
        reason=reason,
        message=f"{reason}.",
        signals={"split.rps": "3"},
        limited_by=limited,
        state=PlannerState(split_threshold=threshold),
        limited_pools=limited_pools,
    )


def cond(autoscale: Autoscale, type_: str) -> Condition:
    return next(c for c in autoscale.conditions if c.type == type_)


# --- base_replicas with the planner's replicas ---------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "planned", "expected"),
    [
        ("planner", {"p": 3}, {"p": 3, "d": 2, "x": 1}),  # planned wins, others keep what runs
        ("planner", {"p": 9, "x": 0}, {"p": 4, "d": 2, "x": 1}),  # clamped into min..max
        ("planner", {}, {"p": 1, "d": 2, "x": 1}),
        ("off", {"p": 3}, {"p": 1, "d": 1, "x": 1}),  # off pins to min whatever was planned
        ("external", {"p": 3}, {"p": None, "d": None, "x": None}),  # left to the HPA/KEDA
        ("recommend", {"p": 3}, {"p": None, "d": None, "x": None}),  # reported, not applied
    ],
)
def test_base_replicas_takes_the_planner_replicas_in_planner_mode(
    mode: str, planned: dict[str, int], expected: dict[str, int | None]
) -> None:
    live = {"p": dep(1), "d": dep(2), "x": dep(1)}
    assert base_replicas(spec(mode), live, planned) == expected


# --- tuning -----------------------------------------------------------------------------------
def test_tuning_from_annotations_overrides_only_readable_values() -> None:
    base = Tuning()
    t = tuning_from(
        {names.ANNOTATION_PLANNER_DOWN_WINDOW: "20", names.ANNOTATION_PLANNER_LEAD_TIME: "soon"}, base
    )
    assert (t.down_window_s, t.lead_time_s) == (20.0, base.lead_time_s)
    assert tuning_from({names.ANNOTATION_PLANNER_DOWN_WINDOW: "-1"}, base) is base
    assert tuning_from(None, base) is base


# --- readings ---------------------------------------------------------------------------------
def test_pool_readings_need_every_deployment_and_mark_missing_metrics_incomplete() -> None:
    s = spec()
    assert pool_readings(s, {"p": dep(1), "d": dep(1)}, {}) is None
    full = PoolObservation(0, 1, 0.1, 10, 10, 1, 0.1, 0.01)
    obs = pool_readings(s, {"p": dep(2, ready=1), "d": dep(1), "x": dep(1)}, {"p": full})
    assert obs is not None
    assert (obs.pools["p"].replicas, obs.pools["p"].ready, obs.pools["p"].starting) == (2, 1, 1)
    assert obs.pools["p"].metrics is full
    assert obs.pools["d"].metrics.complete is False  # no data is never zero load
    assert obs.client_ttft_buckets is None and CLIENT not in obs.pools
    router = PoolObservation(*[None] * 8, ttft_buckets=((2.0, 3.0), (float("inf"), 4.0)))
    seen = pool_readings(s, {"p": dep(1), "d": dep(1), "x": dep(1)}, {"p": full, CLIENT: router})
    assert seen is not None and seen.client_ttft_buckets == ((2.0, 3.0), (float("inf"), 4.0))
    assert set(seen.pools) == {"p", "d", "x"}  # the router's reading is no pool
    assert seen.arrivals is None  # the router answered no arrival query: the engines' demand
    counted = replace(router, requests_per_s=2.0, mean_prompt_tokens=900.0)
    seen = pool_readings(s, {"p": dep(1), "d": dep(1), "x": dep(1)}, {"p": full, CLIENT: counted})
    assert seen is not None and seen.arrivals is counted


def test_missing_metrics_hold_every_pool_and_clear_metrics_available(sample_pools: dict[str, dict]) -> None:
    from tandem.models.accelerator_pool import AcceleratorPoolSpec

    s = spec()
    pools = {k: AcceleratorPoolSpec.model_validate(v) for k, v in sample_pools.items()}
    obs = pool_readings(s, {"p": dep(3), "d": dep(2), "x": dep(1)}, {})
    assert obs is not None
    d = decide(planner_spec(s, pools), obs, PlannerState(), now=100.0)
    current = {"p": 3, "d": 2, "x": 1}
    assert d.changes(current) == {}
    auto = after_decision(s, 4, d, current, None, NOW)
    assert auto.replicas == {}
    c = cond(auto, METRICS_AVAILABLE)
    assert (c.status, c.reason, c.observed_generation) == ("False", "MetricsMissing", 4)


# --- after a decision ------------------------------------------------------------------------
def test_after_decision_merges_replicas_threshold_ratio_and_conditions() -> None:
    s = spec()
    current = {"p": 1, "d": 1, "x": 1}
    first = after_decision(s, 2, decision({"p": 3, "d": None, "x": None}), current, None, NOW)
    assert first.replicas == {"p": 3}
    assert first.split_threshold == 512
    assert first.target_ratio == "3:1"
    assert first.last_decision == DecisionStatus(
        time=NOW, reason="ScaledUp", message="ScaledUp.", signals={"split.rps": "3"}, mode="planner"
    )
    assert cond(first, METRICS_AVAILABLE).status == "True"
    assert (cond(first, SCALING_LIMITED).status, cond(first, SCALING_LIMITED).reason) == (
        "False",
        "WithinLimits",
    )

    # the next decision keeps pool p as planned (None = no opinion) and moves d
    second = after_decision(
        s,
        2,
        decision({"p": None, "d": 2, "x": None}, "Rebalanced", "max", 640),
        {**current, "p": 3},
        first,
        LATER,
    )
    assert second.replicas == {"p": 3, "d": 2}
    assert second.target_ratio == "3:2"
    assert second.split_threshold == 640
    assert (cond(second, SCALING_LIMITED).status, cond(second, SCALING_LIMITED).reason) == (
        "True",
        "MaxReplicas",
    )
    assert second.last_decision is not None and second.last_decision.time == LATER


@pytest.mark.parametrize(
    ("limited", "pools", "reason", "message"),
    [
        ("max", ("p",), "MaxReplicas", "Demand needs more replicas than replicas.max allows on pool p."),
        (
            "min",
            ("d", "x"),
            "MinReplicas",
            "Demand needs fewer replicas than replicas.min keeps on pools d and x.",
        ),
        (
            "budget",
            ("d", "p", "x"),
            "BudgetLimited",
            "The budget (maxDevices or maxCostPerHour) allows no more replicas; it cut pools d, p and x.",
        ),
        ("max", (), "MaxReplicas", "Demand needs more replicas than replicas.max allows on some pool."),
    ],
)
def test_scaling_limited_names_the_pools_the_bound_binds_on(
    limited: str, pools: tuple[str, ...], reason: str, message: str
) -> None:
    out = after_decision(spec(), 1, decision({}, "Steady", limited, limited_pools=pools), {"p": 1}, None, NOW)
    c = cond(out, SCALING_LIMITED)
    assert (c.status, c.reason, c.message) == ("True", reason, message)


def test_an_unchanged_decision_keeps_last_decision_so_status_is_not_rewritten() -> None:
    s = spec()
    current = {"p": 1, "d": 1, "x": 1}
    a = after_decision(s, 1, decision({}, "Steady"), current, None, NOW)
    b = after_decision(s, 1, decision({}, "Steady"), current, a, LATER)
    assert b == a


def test_target_ratio_counts_pools_the_planner_left_alone() -> None:
    assert target_ratio(spec(), {"p": 2}, {"p": 1, "d": 4, "x": 1}) == "1:2"


# --- holds ---------------------------------------------------------------------------------
def test_prometheus_unavailable_changes_nothing_but_metrics_available() -> None:
    s = spec()
    before = after_decision(s, 1, decision({"p": 3}, limited="max"), {"p": 1, "d": 1, "x": 1}, None, NOW)
    held = after_hold(1, PROMETHEUS_UNAVAILABLE, "Could not read.", before, LATER)
    assert held.replicas == before.replicas == {"p": 3}
    assert held.split_threshold == before.split_threshold
    assert (cond(held, METRICS_AVAILABLE).status, cond(held, METRICS_AVAILABLE).reason) == (
        "False",
        PROMETHEUS_UNAVAILABLE,
    )
    assert cond(held, SCALING_LIMITED) == cond(before, SCALING_LIMITED)
    assert held.last_decision is not None and held.last_decision.reason == PROMETHEUS_UNAVAILABLE
    fresh = after_hold(1, PROMETHEUS_UNAVAILABLE, "Could not read.", None, NOW)
    assert fresh.replicas == {} and [c.type for c in fresh.conditions] == [METRICS_AVAILABLE]


# --- status -----------------------------------------------------------------------------------
def test_planner_status_sets_and_clears_the_planner_fields() -> None:
    s = spec()
    auto = after_decision(s, 1, decision({"p": 2}), {"p": 1, "d": 1, "x": 1}, None, NOW)
    base = InferenceServiceStatus(
        conditions=[Condition(type="Ready", status="True", reason="AllReplicasReady")], ratio="1:1"
    )
    st = planner_status(base, "planner", auto, LATER)
    assert [c.type for c in st.conditions] == ["Ready", METRICS_AVAILABLE, SCALING_LIMITED]
    assert all(c.last_transition_time == LATER for c in st.conditions if c.type != "Ready")
    assert (st.target_ratio, st.ratio) == ("2:1", "1:1")
    assert st.last_decision == auto.last_decision
    assert planner_status(base, "planner", None, LATER) is base  # nothing decided yet
    cleared = planner_status(st, "off", None, LATER)
    assert [c.type for c in cleared.conditions] == ["Ready"]
    assert cleared.last_decision is None and cleared.target_ratio is None


def test_recommend_mode_reports_replicas_as_would_and_clears_when_left() -> None:
    s = spec("recommend")
    d = as_recommendation(replace(decision({"p": 3}), message="Scaled up: p 1->3."))
    assert (d.reason, d.message) == ("RecommendScaleUp", f"{RECOMMEND_NOTE} Would scale up: p 1->3.")
    capped = as_recommendation(
        replace(decision({"p": 3}, reason="BudgetLimited"), message="Scaled up: p 1->3.")
    )
    assert (capped.reason, capped.message) == ("BudgetLimited", f"{RECOMMEND_NOTE} Would scale up: p 1->3.")
    held = as_recommendation(decision({}, reason="StabilisingScaleDown"))
    assert held.reason == "StabilisingScaleDown" and held.message.startswith(RECOMMEND_NOTE)
    current = {"p": 1, "d": 1, "x": 1}
    auto = after_decision(s, 1, d, current, None, NOW)
    assert auto.recommended == {"p": 3}  # only the pools it would change
    assert auto.replicas == {} and auto.target_ratio == "3:1" and auto.mode == "recommend"
    # a hold under another mode does not carry the other mode's decision over
    held_after = after_hold(1, "PrometheusUnavailable", "down", auto, LATER, "planner")
    assert held_after.mode == "planner" and held_after.recommended == {} and held_after.last_decision
    assert after_hold(1, "PrometheusUnavailable", "down", auto, LATER, "recommend").recommended == {"p": 3}
    base = InferenceServiceStatus(
        pools=[
            PoolStatus(name=n, role=r, accelerator_pool="a", desired_replicas=1, ready_replicas=1)
            for n, r in (("p", "prefill"), ("d", "decode"), ("x", "mixed"))
        ]
    )
    st = planner_status(base, "recommend", auto, LATER)
    assert [(p.name, p.desired_replicas, p.recommended_replicas) for p in st.pools] == [
        ("p", 1, 3),
        ("d", 1, None),
        ("x", 1, None),
    ]
    assert st.last_decision is not None and st.last_decision.reason == "RecommendScaleUp"
    wire = st.to_wire()
    assert wire["pools"][0]["recommendedReplicas"] == 3
    cleared = planner_status(st, "external", None, LATER)
    assert all(p.recommended_replicas is None for p in cleared.pools) and cleared.last_decision is None
