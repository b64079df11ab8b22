"""One autoscaling step (tandem.autoscaler) with in-memory stand-ins for the API and Prometheus:
a failed read holds without calling the planner; a good read stores a decision and asks for a
reconcile."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from prometheus_client import REGISTRY

from tandem.autoscaler import WARNING_REPEAT_S, Autoscaler, AutoscalerSettings
from tandem.kube import KubeError
from tandem.planner import PlannerState
from tandem.scaling import METRICS_AVAILABLE, SCALING_LIMITED, state_configmap

URL = "http://prometheus.test:9090"
KEY = ("team-a", "chat")


def body() -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "namespace": "team-a", "generation": 3, "uid": "u"},
        "spec": {
            "model": {"name": "m", "preset": "llama-3.1-8b"},
            "engine": "sim",
            "pools": [
                {
                    "name": "prefill",
                    "role": "prefill",
                    "acceleratorPool": "b200",
                    "replicas": {"min": 1, "max": 4},
                },
                {
                    "name": "decode",
                    "role": "decode",
                    "acceleratorPool": "gaudi3",
                    "replicas": {"min": 1, "max": 4},
                },
            ],
            "autoscaling": {"mode": "planner", "intervalSeconds": 5, "prometheusUrl": URL},
        },
    }


class Deployments:
    def __init__(self) -> None:
        self.replicas = {"prefill": 1, "decode": 1}  # what runs (an HPA may change it)
        self.configmaps: dict[str, dict[str, Any]] = {}  # the planner's state ConfigMaps, by path
        self.applies = 0

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None, **_: Any) -> dict:
        """A LIST of ConfigMaps by name (the chart's RBAC grants list, not get)."""
        assert method == "GET" and path.endswith("/configmaps"), (method, path)
        name = dict(query or [])["fieldSelector"].removeprefix("metadata.name=")
        found = self.configmaps.get(f"{path}/{name}")
        return {"items": [copy.deepcopy(found)] if found else []}

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        assert manifest["kind"] == "ConfigMap"
        meta = manifest["metadata"]
        self.configmaps[f"/api/v1/namespaces/{meta['namespace']}/configmaps/{meta['name']}"] = copy.deepcopy(
            manifest
        )
        self.applies += 1
        return manifest

    def list_objects(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        assert kind == "Deployment" and namespace == "team-a"
        return [
            {
                "metadata": {"name": f"chat-{p}", "labels": {"inference.tandem.dev/pool": p}},
                "spec": {"replicas": n},
                "status": {"readyReplicas": n},
            }
            for p, n in self.replicas.items()
        ]


class Prom:
    """Answers every query with one sample per pool (or raises, when down)."""

    def __init__(self, down: bool = False) -> None:
        self.down = down

    def custom_query(self, query: str, params: Any = None, timeout: Any = None) -> list[dict[str, Any]]:
        if self.down:
            raise ConnectionError("connection refused")
        value = "4" if "rate(vllm:request_success_total" in query else "0"
        if "_sum" in query:
            value = "0.05"
        return [{"metric": {"pool": p}, "value": [0, value]} for p in ("prefill", "decode")]


def scaler(sample_pools: dict[str, dict], prom: Prom) -> tuple[Autoscaler, list[Any], list[Any]]:
    requested: list[Any] = []
    events: list[Any] = []
    a = Autoscaler(
        Deployments(),  # type: ignore[arg-type]
        {KEY: body()},
        sample_pools,
        requested.append,
        lambda kube, b, type_, reason, message: events.append((type_, reason)),
        AutoscalerSettings(),
    )
    a._clients[URL] = prom  # the stand-in for the HTTP client
    return a, requested, events


def test_prometheus_down_holds_without_a_decision(sample_pools: dict[str, dict]) -> None:
    a, requested, events = scaler(sample_pools, Prom(down=True))
    auto = asyncio.run(a.step(KEY, body(), now=100.0))
    assert auto is not None and auto.replicas == {}
    cond = next(c for c in auto.conditions if c.type == METRICS_AVAILABLE)
    assert (cond.status, cond.reason) == ("False", "PrometheusUnavailable")
    assert requested == [KEY] and events == [("Warning", "PrometheusUnavailable")]
    assert a.current(KEY) == auto
    labels = {"namespace": "team-a", "service": "chat"}
    assert REGISTRY.get_sample_value("tandem_planner_holding", labels) == 1  # for the alert
    # no metrics: neither the error budget nor the limits are known, so none is exported
    assert REGISTRY.get_sample_value("tandem_planner_ttft_within_target_ratio", labels) is None
    assert REGISTRY.get_sample_value("tandem_planner_limited", {**labels, "by": "budget"}) is None
    a._clients[URL] = Prom()  # Prometheus back: a decision from data ends the hold
    asyncio.run(a.step(KEY, body(), now=105.0))
    assert REGISTRY.get_sample_value("tandem_planner_holding", labels) == 0
    assert REGISTRY.get_sample_value("tandem_planner_limited", {**labels, "by": "budget"}) == 0
    a.forget(KEY)
    assert REGISTRY.get_sample_value("tandem_planner_holding", labels) is None


def test_a_good_read_stores_a_decision_and_requests_a_reconcile(sample_pools: dict[str, dict]) -> None:
    a, requested, _ = scaler(sample_pools, Prom())
    auto = asyncio.run(a.step(KEY, body(), now=100.0))
    assert auto is not None and auto.last_decision is not None
    cond = next(c for c in auto.conditions if c.type == METRICS_AVAILABLE)
    assert (cond.status, cond.observed_generation) == ("True", 3)
    assert requested == [KEY]
    again = asyncio.run(a.step(KEY, body(), now=105.0))
    assert again is not None
    labels = {"namespace": "team-a", "service": "chat"}
    assert REGISTRY.get_sample_value("tandem_planner_attainment_target_ratio", labels) == 0.9
    # no first tokens read yet: the error budget is unknown, so no attainment series at all
    assert REGISTRY.get_sample_value("tandem_planner_ttft_within_target_ratio", labels) is None
    a.forget(KEY)
    assert a.current(KEY) is None
    assert REGISTRY.get_sample_value("tandem_planner_attainment_target_ratio", labels) is None


class BusyProm(Prom):
    """Every pool busy: 40 requests/s of 2,000-token prompts, 30 waiting, first tokens in 0.5 s."""

    def custom_query(self, query: str, params: Any = None, timeout: Any = None) -> list[dict[str, Any]]:
        value = "0"
        if "request_success_total" in query or "_count" in query:
            value = "40"
        if "prompt_tokens_total" in query:
            value = "80000"
        elif "prompt_tokens_sum" in query:
            value = "2000"  # the query divides by the count: a mean
        elif "time_to_first_token" in query and "_sum" in query:
            value = "0.5"
        elif "_sum" in query:
            value = "0.03"
        if "num_requests_waiting" in query:
            value = "30"
        return [{"metric": {"pool": p}, "value": [0, value]} for p in ("prefill", "decode")]


def recommend_body() -> dict[str, Any]:
    b = body()
    b["spec"]["autoscaling"]["mode"] = "recommend"
    return b


def test_recommend_mode_reports_the_planners_replicas_without_applying_them(
    sample_pools: dict[str, dict],
) -> None:
    planner, _, planner_events = scaler(sample_pools, BusyProm())
    applied = asyncio.run(planner.step(KEY, body(), now=100.0))
    assert applied is not None and applied.last_decision is not None
    assert applied.last_decision.reason == "ScaledUp", applied.last_decision
    assert applied.replicas["prefill"] > 1

    a, requested, events = scaler(sample_pools, BusyProm())
    a.services[KEY] = recommend_body()
    auto = asyncio.run(a.step(KEY, recommend_body(), now=100.0))
    assert auto is not None and auto.last_decision is not None
    assert auto.last_decision.reason == "RecommendScaleUp"
    assert auto.last_decision.message.startswith("Not applied (autoscaling.mode: recommend). Would scale up:")
    assert auto.recommended == applied.replicas  # what planner mode applies, reported only
    assert auto.replicas == {} and auto.mode == "recommend"
    assert events == [("Normal", "RecommendScaleUp")] and requested == [KEY]
    # the same recommendation again (the Deployments still run one replica each): no new Event
    again = asyncio.run(a.step(KEY, recommend_body(), now=105.0))
    assert again is not None and again.recommended == auto.recommended
    # nor when an HPA moves a pool the planner would leave alone
    a.kube.replicas["decode"] = 2  # type: ignore[attr-defined]
    third = asyncio.run(a.step(KEY, recommend_body(), now=110.0))
    assert third is not None and third.recommended == auto.recommended
    assert events == [("Normal", "RecommendScaleUp")]
    assert planner_events[0] == ("Normal", "ScaledUp")

    # to planner mode: nothing of the recommendations is applied until the planner decides
    a.services[KEY] = body()
    assert a.current(KEY) is not None and a.current(KEY).mode == "recommend"  # type: ignore[union-attr]
    decided = asyncio.run(a.step(KEY, body(), now=115.0))
    assert decided is not None and decided.mode == "planner" and decided.recommended == {}
    assert set(decided.replicas) <= {"prefill", "decode"} and decided.replicas.get("prefill", 0) > 1
    assert events[-1] == ("Normal", "ScaledUp")


def test_forget_all_drops_every_services_decision(sample_pools: dict[str, dict]) -> None:
    """A replica taking over as the active one must not apply what it decided in an earlier term."""
    a, _, _ = scaler(sample_pools, BusyProm())
    assert asyncio.run(a.step(KEY, body(), now=100.0)) is not None
    assert a.current(KEY) is not None
    a.forget_all()
    assert a.current(KEY) is None


class NegativeProm(Prom):
    """A broken exporter: a negative request rate on every pool."""

    def custom_query(self, query: str, params: Any = None, timeout: Any = None) -> list[dict[str, Any]]:
        rows = super().custom_query(query, params, timeout)
        if "rate(vllm:request_success_total" in query:
            for row in rows:
                row["value"] = [0, "-4"]
        return rows


def test_a_hold_on_untrustworthy_metrics_posts_one_warning(sample_pools: dict[str, dict]) -> None:
    a, _, events = scaler(sample_pools, NegativeProm())
    auto = asyncio.run(a.step(KEY, body(), now=100.0))
    assert auto is not None and auto.last_decision is not None
    assert auto.last_decision.reason == "MetricsImplausible"
    assert events == [("Warning", "MetricsImplausible")]
    asyncio.run(a.step(KEY, body(), now=105.0))
    assert events == [("Warning", "MetricsImplausible")]  # not one per interval while it lasts
    a._clients[URL] = Prom()  # the exporter fixed: the hold ends, no Warning
    asyncio.run(a.step(KEY, body(), now=110.0))
    assert [e for e in events if e[0] == "Warning"] == [("Warning", "MetricsImplausible")]
    a.forget(KEY)


class LightProm(BusyProm):
    """Every pool lightly loaded: 1 request/s of 2,000-token prompts, none waiting (one replica
    of each pool serves it)."""

    def custom_query(self, query: str, params: Any = None, timeout: Any = None) -> list[dict[str, Any]]:
        rows = super().custom_query(query, params, timeout)
        value = None
        if "request_success_total" in query or "_count" in query:
            value = "1"
        if "prompt_tokens_total" in query:
            value = "2000"
        if "num_requests_waiting" in query:
            value = "0"
        for row in rows:
            row["value"] = [0, value] if value is not None else row["value"]
        return rows


def limited_after_one_step(sample_pools: dict[str, dict], prom: Prom, decode_min: int) -> tuple[str, str]:
    spec = body()
    spec["spec"]["pools"][1]["replicas"] = {"min": decode_min, "max": 4}
    a, _, _ = scaler(sample_pools, prom)
    a.services[KEY] = spec
    a.kube.replicas = {"prefill": 1, "decode": decode_min}  # type: ignore[attr-defined]
    auto = asyncio.run(a.step(KEY, spec, now=100.0))
    a.forget(KEY)
    assert auto is not None
    cond = next(c for c in auto.conditions if c.type == SCALING_LIMITED)
    return cond.status, cond.reason


def test_scaling_limited_says_when_a_pools_min_binds(sample_pools: dict[str, dict]) -> None:
    """The planner sizes every pool from its replicas.min up; when the demand needs fewer
    replicas than the min, ScalingLimited says the min binds, not "within limits"."""
    assert limited_after_one_step(sample_pools, LightProm(), 1) == ("False", "WithinLimits")
    assert limited_after_one_step(sample_pools, LightProm(), 3) == ("True", "MinReplicas")
    assert limited_after_one_step(sample_pools, Prom(), 1) == ("True", "MinReplicas")  # no demand
    # a bound the planner reports itself wins
    assert limited_after_one_step(sample_pools, BusyProm(), 1) == ("True", "MaxReplicas")


def test_a_slo_out_of_reach_or_a_binding_budget_posts_one_warning(sample_pools: dict[str, dict]) -> None:
    """The SLO may be missed: a Warning Event (not Normal) when the situation starts, also when
    no replica changes, and none per interval while it lasts."""
    strict = body()
    strict["spec"]["slo"] = {"ttftSeconds": 0.001, "itlSeconds": 0.0001}  # no accelerator is that fast
    a, _, events = scaler(sample_pools, LightProm())
    a.services[KEY] = strict
    for now in (100.0, 105.0, 110.0):
        auto = asyncio.run(a.step(KEY, strict, now=now))
        assert auto is not None and auto.last_decision is not None
        assert auto.last_decision.reason == "SloInfeasible" and auto.replicas == {}
    assert events == [("Warning", "SloInfeasible")]
    a.forget(KEY)

    capped = body()
    capped["spec"]["autoscaling"]["budget"] = {"maxDevices": 3}
    a, _, events = scaler(sample_pools, BusyProm())
    a.services[KEY] = capped
    reasons = []
    for now in (100.0, 105.0, 110.0):
        auto = asyncio.run(a.step(KEY, capped, now=now))
        assert auto is not None and auto.last_decision is not None
        reasons.append(auto.last_decision.reason)
        a.kube.replicas.update(auto.replicas)  # type: ignore[attr-defined]  # the reconcile applied them
    assert reasons == ["BudgetLimited"] * 3  # scaled up as far as the budget allows, then no more
    assert events == [("Warning", "BudgetLimited")]
    a.forget(KEY)


def test_a_warning_that_comes_and_goes_posts_again_only_after_the_repeat_interval(
    sample_pools: dict[str, dict],
) -> None:
    """An SLO out of reach every other interval (sparse traffic) posts one Warning, not one per
    return; once ``WARNING_REPEAT_S`` passed it posts again."""
    strict = body()
    strict["spec"]["slo"] = {"ttftSeconds": 0.001, "itlSeconds": 0.0001}
    normal = body()
    a, _, events = scaler(sample_pools, LightProm())
    now, reasons = 100.0, []
    for i in range(12):
        spec = strict if i % 2 == 0 else normal
        a.services[KEY] = spec
        auto = asyncio.run(a.step(KEY, spec, now=now))
        assert auto is not None and auto.last_decision is not None
        reasons.append(auto.last_decision.reason)
        now += 5.0
    assert reasons[0::2] == ["SloInfeasible"] * 6 and "SloInfeasible" not in reasons[1::2]
    warnings = [e for e in events if e[0] == "Warning"]
    assert warnings == [("Warning", "SloInfeasible")]
    a.services[KEY] = strict
    asyncio.run(a.step(KEY, strict, now=now + WARNING_REPEAT_S))
    assert [e for e in events if e[0] == "Warning"] == [("Warning", "SloInfeasible")] * 2
    a.forget(KEY)


def test_a_warning_situation_that_lasts_through_a_restart_is_not_told_again(
    sample_pools: dict[str, dict],
) -> None:
    """The planner's memory is the operator's: after a restart (or a handover to another
    replica) it has decided nothing yet. The last decision is then the one the status holds,
    so an SLO still out of reach posts no second Warning; one that starts now does."""
    strict = body()
    strict["spec"]["slo"] = {"ttftSeconds": 0.001, "itlSeconds": 0.0001}
    first, _, events = scaler(sample_pools, LightProm())
    first.services[KEY] = strict
    auto = asyncio.run(first.step(KEY, strict, now=100.0))
    assert auto is not None and auto.last_decision is not None
    assert events == [("Warning", "SloInfeasible")]
    stored = {**strict, "status": {"lastDecision": auto.last_decision.model_dump(by_alias=True)}}

    restarted, _, after = scaler(sample_pools, LightProm())
    restarted.services[KEY] = stored
    again = asyncio.run(restarted.step(KEY, stored, now=105.0))
    assert again is not None and again.last_decision is not None
    assert again.last_decision.reason == "SloInfeasible" and after == []
    restarted.forget(KEY)

    # the status told another reason: the situation starts now
    told_other = {
        **strict,
        "status": {"lastDecision": {"reason": "Steady", "message": "Capacity matches demand."}},
    }
    fresh, _, new = scaler(sample_pools, LightProm())
    fresh.services[KEY] = told_other
    asyncio.run(fresh.step(KEY, told_other, now=105.0))
    assert new == [("Warning", "SloInfeasible")]
    fresh.forget(KEY)


STATE_PATH = f"/api/v1/namespaces/team-a/configmaps/{state_configmap('chat')}"


def test_the_planners_memory_is_kept_in_a_configmap_the_service_owns(sample_pools: dict[str, dict]) -> None:
    a, _, _ = scaler(sample_pools, BusyProm())
    asyncio.run(a.step(KEY, body(), now=100.0))
    cm = a.kube.configmaps[STATE_PATH]  # type: ignore[attr-defined]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u"  # deleted with the service
    # neither pruned by the reconcile nor watched as a child (both select app.kubernetes.io/managed-by)
    assert "app.kubernetes.io/managed-by" not in cm["metadata"]["labels"]
    stored = PlannerState.from_json(cm["data"]["state"])
    assert stored.last_time == 100.0 and stored.recommendations
    # written at most every persist_seconds, not every decision
    asyncio.run(a.step(KEY, body(), now=105.0))
    assert a.kube.applies == 1  # type: ignore[attr-defined]
    asyncio.run(a.step(KEY, body(), now=100.0 + a.settings.persist_seconds))
    assert a.kube.applies == 2  # type: ignore[attr-defined]
    a.forget(KEY)


def test_a_restarted_operator_starts_from_the_stored_memory(sample_pools: dict[str, dict]) -> None:
    """What the planner learned survives a restart (or a handover): the first decision of the
    new operator starts from the ConfigMap, when it is this service's and at most the error
    budget's window old; else afresh. After a gap of more than ``gap_intervals`` the planner restarts its
    scale-down window as after any gap, but keeps the rest (the burst memory here)."""
    first, _, _ = scaler(sample_pools, BusyProm())
    asyncio.run(first.step(KEY, body(), now=100.0))
    stored = copy.deepcopy(first.kube.configmaps)  # type: ignore[attr-defined]
    first.forget(KEY)

    def restarted(now: float, owner: dict[str, Any] | None = None) -> PlannerState:
        a, _, _ = scaler(sample_pools, BusyProm())
        a.kube.configmaps = copy.deepcopy(stored)  # type: ignore[attr-defined]
        asyncio.run(a.step(KEY, owner or body(), now=now))
        state = a._state[KEY].state
        a.forget(KEY)
        return state

    soon = restarted(105.0)  # within the gap: the window goes on
    assert [t for t, _ in soon.recommendations["prefill"]] == [100.0, 105.0]
    assert [t for t, _ in soon.arrivals] == [100.0, 105.0]
    later = restarted(160.0)  # past the gap (2.5 intervals of 5 s): a new window, the memory kept
    assert [t for t, _ in later.recommendations["prefill"]] == [160.0]
    assert [t for t, _ in later.arrivals] == [100.0, 160.0]
    # a namesake service (another uid) or a memory older than the error budget's window: afresh
    other = body()
    other["metadata"]["uid"] = "v"
    assert [t for t, _ in restarted(105.0, other).arrivals] == [105.0]
    stale = 100.0 + first.settings.tuning.slo_window_s + 1.0
    assert [t for t, _ in restarted(stale).arrivals] == [stale]


class ForbiddenConfigMaps(Deployments):
    """An operator without permission on ConfigMaps (rbac.create=false, an old role)."""

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.applies += 1
        raise KubeError(403, "Forbidden")


def test_a_memory_that_cannot_be_written_is_tried_again_only_every_persist_seconds(
    sample_pools: dict[str, dict],
) -> None:
    """The planner goes on deciding; the write is retried after ``persist_seconds``, so a missing
    permission logs one warning per service every few minutes, not one per interval."""
    a, _, _ = scaler(sample_pools, BusyProm())
    a.kube = ForbiddenConfigMaps()
    for now in (100.0, 105.0, 110.0):
        auto = asyncio.run(a.step(KEY, body(), now=now))
        assert auto is not None and auto.last_decision is not None
    assert a.kube.applies == 1
    asyncio.run(a.step(KEY, body(), now=100.0 + a.settings.persist_seconds))
    assert a.kube.applies == 2
    a.forget(KEY)
