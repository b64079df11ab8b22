"""The planner's results as an input of the reconcile (pure).

The autoscaling loop (:mod:`tandem.autoscaler`) reads metrics and calls
:func:`tandem.planner.decide`; what it concluded travels to the one reconcile path as an
:class:`Autoscale`: replicas per pool, the router's split threshold, ``status.lastDecision``,
``status.targetRatio`` and the planner's conditions (``MetricsAvailable``, ``ScalingLimited``).
The planner never writes a Deployment itself. Everything here is pure: no I/O, time as data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tandem import names
from tandem.models.common import Condition, ConditionStatus
from tandem.models.inference_service import Decision as DecisionStatus
from tandem.models.inference_service import InferenceServiceSpec, InferenceServiceStatus
from tandem.planner.types import (
    CLIENT,
    Decision,
    Observation,
    PlannerState,
    PoolObservation,
    PoolReading,
    Tuning,
)
from tandem.status import ratio, set_conditions

METRICS_AVAILABLE = "MetricsAvailable"
SCALING_LIMITED = "ScalingLimited"

# Decision reasons of the planner that mean "the data could not be trusted" (tandem.planner.core.check).
DATA_REASONS = frozenset({"MetricsMissing", "MetricsImplausible", "ScrapeGap"})
# Decision reasons a user may have to act on (the SLO may be missed: relax it, or give the role
# faster pools or more budget): their Events are Warnings, posted when the situation starts.
WARNING_REASONS = frozenset({"SloInfeasible", "BudgetLimited"})
# Holds decided before the planner runs (no observation at all).
PROMETHEUS_UNAVAILABLE = "PrometheusUnavailable"
PROMETHEUS_NOT_CONFIGURED = "PrometheusNotConfigured"

_LIMITED = {
    "min": ("MinReplicas", "Demand needs fewer replicas than replicas.min keeps on {pools}."),
    "max": ("MaxReplicas", "Demand needs more replicas than replicas.max allows on {pools}."),
    "budget": (
        "BudgetLimited",
        "The budget (maxDevices or maxCostPerHour) allows no more replicas; it cut {pools}.",
    ),
}

_WITHIN_LIMITS = "No replicas.min, replicas.max or budget bound the planner's last decision."

# Annotation -> Tuning field (seconds). The CRD has no field for these knobs yet; they exist so a
# local cluster (pods start in seconds) and the e2e tests can use short windows.
_TUNING_ANNOTATIONS = {
    names.ANNOTATION_PLANNER_DOWN_WINDOW: "down_window_s",
    names.ANNOTATION_PLANNER_LEAD_TIME: "lead_time_s",
}


@dataclass(frozen=True)
class Autoscale:
    """What the planner wants for one InferenceService, as the reconcile's input.

    ``replicas``: pool -> replicas the planner set (pools not listed: keep what runs).
    ``split_threshold``: prompt tokens at which the router splits (``None``: the spec's).
    ``conditions``: the planner's conditions, without transition times (the reconcile merges them).
    ``mode``: the autoscaling mode it was decided in; the reconcile ignores it under another.
    ``recommended`` (``recommend`` mode): pool -> replicas the latest decision would set, for the
    pools it would change (``status.pools[].recommendedReplicas``); ``replicas`` is then empty and
    the reconcile does not apply ``split_threshold``: both are reported only.
    """

    replicas: Mapping[str, int]
    split_threshold: int | None = None
    last_decision: DecisionStatus | None = None
    target_ratio: str | None = None
    conditions: tuple[Condition, ...] = ()
    recommended: Mapping[str, int] = field(default_factory=dict)
    mode: str = "planner"


PLANNED_MODES = frozenset({"planner", "recommend"})  # autoscaling modes in which the planner runs


def for_mode(autoscale: Autoscale | None, mode: str) -> Autoscale | None:
    """``autoscale`` unless it was decided under another autoscaling mode (the spec changed it
    since): nothing of the old mode applies, the planner decides afresh."""
    return autoscale if autoscale is not None and autoscale.mode == mode else None


def holding(reason: str) -> bool:
    """Whether a decision (or a hold before the planner ran) with this reason was made without
    usable metrics: nothing changes, and ``MetricsAvailable`` is False."""
    return reason in (PROMETHEUS_UNAVAILABLE, PROMETHEUS_NOT_CONFIGURED) or reason in DATA_REASONS


# In recommend mode nothing is applied: the reasons and messages say what the planner would do.
_WOULD = {
    "ScaledUp": ("RecommendScaleUp", "Scaled up:", "Would scale up:"),
    "ScaledDown": ("RecommendScaleDown", "Scaled down:", "Would scale down:"),
    "Rebalanced": ("RecommendRebalance", "Moved capacity:", "Would move capacity:"),
}
RECOMMEND_NOTE = "Not applied (autoscaling.mode: recommend)."


def as_recommendation(decision: Decision) -> Decision:
    """``decision`` worded as a recommendation (``autoscaling.mode: recommend``): a change the
    planner would make gets a ``Recommend*`` reason and a "Would ..." message, and every message
    says that nothing was applied."""
    reason, message = decision.reason, decision.message
    for done_reason, (would_reason, done, would) in _WOULD.items():
        reason = would_reason if reason == done_reason else reason
        message = message.replace(done, would)  # BudgetLimited and SloInfeasible list moves too
    return replace(decision, reason=reason, message=f"{RECOMMEND_NOTE} {message}")


def tuning_from(annotations: Mapping[str, str] | None, base: Tuning) -> Tuning:
    """``base`` with the planner-tuning annotations applied; unreadable or negative values are ignored."""
    changes: dict[str, float] = {}
    for key, field_name in _TUNING_ANNOTATIONS.items():
        raw = (annotations or {}).get(key)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            changes[field_name] = value
    if not changes:
        return base
    return replace(
        base,
        down_window_s=changes.get("down_window_s", base.down_window_s),
        lead_time_s=changes.get("lead_time_s", base.lead_time_s),
    )


def pool_readings(
    spec: InferenceServiceSpec,
    deployments: Mapping[str, Mapping[str, Any]],
    metrics: Mapping[str, PoolObservation],
) -> Observation | None:
    """The planner's observation: replica counts from the live Deployments, metrics from Prometheus.

    ``None`` while some pool has no Deployment yet (nothing to scale). A pool without metrics
    gets an empty (incomplete) observation, so the planner holds instead of reading zero load.
    """
    out: dict[str, PoolReading] = {}
    for pool in spec.pools:
        dep = deployments.get(pool.name)
        if dep is None:
            return None
        replicas = int((dep.get("spec") or {}).get("replicas", 0) or 0)
        ready = int((dep.get("status") or {}).get("readyReplicas", 0) or 0)
        out[pool.name] = PoolReading(
            replicas=replicas,
            ready=min(ready, replicas) if replicas else ready,
            starting=max(0, replicas - ready),
            metrics=metrics.get(pool.name) or PoolObservation.empty(complete=False),
        )
    client = metrics.get(CLIENT)
    if client is None:
        return Observation(pools=out)
    arrivals = client if client.requests_per_s is not None else None
    return Observation(pools=out, client_ttft_buckets=client.ttft_buckets, arrivals=arrivals)


def target_ratio(spec: InferenceServiceSpec, replicas: Mapping[str, int], current: Mapping[str, int]) -> str:
    """prefill:decode of the planner's replicas (pools it left alone count as they run)."""
    per_role = {"prefill": 0, "decode": 0}
    for pool in spec.pools:
        if pool.role in per_role:
            per_role[pool.role] += replicas.get(pool.name, current.get(pool.name, 0))
    return ratio(per_role["prefill"], per_role["decode"])


def _cond(type_: str, status: ConditionStatus, reason: str, message: str, generation: int) -> Condition:
    return Condition(
        type=type_, status=status, reason=reason, message=message, observed_generation=generation
    )


def metrics_condition(reason: str, message: str, generation: int) -> Condition:
    """``MetricsAvailable`` after a decision (or a hold) with this reason."""
    if holding(reason):
        return _cond(METRICS_AVAILABLE, "False", reason, message, generation)
    return _cond(
        METRICS_AVAILABLE, "True", "MetricsRead", "The planner read every pool's metrics.", generation
    )


def limited_condition(limited_by: str | None, generation: int, pools: Sequence[str] = ()) -> Condition:
    """``ScalingLimited`` for the bound that bit (``None``: none did), naming the ``pools``
    it bit on."""
    if limited_by is None:
        return _cond(SCALING_LIMITED, "False", "WithinLimits", _WITHIN_LIMITS, generation)
    reason, template = _LIMITED[limited_by]
    named = _pool_list(pools) if pools else "some pool"
    return _cond(SCALING_LIMITED, "True", reason, template.format(pools=named), generation)


def _pool_list(pools: Sequence[str]) -> str:
    """'pool a', 'pools a and b', 'pools a, b and c'."""
    if len(pools) == 1:
        return f"pool {pools[0]}"
    return f"pools {', '.join(pools[:-1])} and {pools[-1]}"


def _last_decision(
    previous: DecisionStatus | None,
    reason: str,
    message: str,
    signals: Mapping[str, str],
    now: str,
    mode: str = "planner",
) -> DecisionStatus:
    """A new ``lastDecision`` when the reason or message changed, else the previous one.

    Repeating an unchanged decision (``Steady`` every interval) would rewrite the status each
    interval only to move a timestamp; the signals are those of the decision that changed it.
    """
    if previous is not None and (previous.reason, previous.message, previous.mode) == (reason, message, mode):
        return previous
    return DecisionStatus(time=now, reason=reason, message=message, signals=dict(signals), mode=mode)


def after_decision(
    spec: InferenceServiceSpec,
    generation: int,
    decision: Decision,
    current: Mapping[str, int],
    previous: Autoscale | None,
    now: str,
) -> Autoscale:
    """The Autoscale after ``decision``; ``current``: pool -> replicas running now."""
    previous = for_mode(previous, spec.autoscaling.mode)
    replicas = dict(previous.replicas) if previous else {}
    replicas.update({k: v for k, v in decision.replicas.items() if v is not None})
    replicas = {p.name: replicas[p.name] for p in spec.pools if p.name in replicas}
    threshold = decision.state.split_threshold
    if threshold is None and previous is not None:
        threshold = previous.split_threshold
    mode = spec.autoscaling.mode
    recommended: dict[str, int] = {}
    if mode == "recommend":  # nothing applied: the target is the latest recommendation
        recommended = {p.name: v for p in spec.pools if (v := decision.replicas.get(p.name)) is not None}
        replicas = {}
    return Autoscale(
        replicas=replicas,
        split_threshold=threshold,
        last_decision=_last_decision(
            previous.last_decision if previous else None,
            decision.reason,
            decision.message,
            decision.signals,
            now,
            spec.autoscaling.mode,
        ),
        target_ratio=target_ratio(spec, recommended if mode == "recommend" else replicas, current),
        conditions=(
            metrics_condition(decision.reason, decision.message, generation),
            limited_condition(decision.limited_by, generation, decision.limited_pools),
        ),
        recommended=recommended,
        mode=mode,
    )


def after_hold(
    generation: int, reason: str, message: str, previous: Autoscale | None, now: str, mode: str = "planner"
) -> Autoscale:
    """The Autoscale when no decision could be made (no Prometheus): nothing changes but the
    ``MetricsAvailable`` condition and ``lastDecision``; ``ScalingLimited`` stays as it was."""
    base = for_mode(previous, mode) or Autoscale(replicas={}, mode=mode)
    return replace(
        base,
        last_decision=_last_decision(base.last_decision, reason, message, {}, now, mode),
        conditions=(
            metrics_condition(reason, message, generation),
            *(c for c in base.conditions if c.type != METRICS_AVAILABLE),
        ),
    )


def apply_to_status(status: InferenceServiceStatus, autoscale: Autoscale, now: str) -> InferenceServiceStatus:
    """``status`` with the planner's fields and conditions (other conditions kept)."""
    pools = [
        p.model_copy(update={"recommended_replicas": autoscale.recommended.get(p.name)}) for p in status.pools
    ]
    return status.model_copy(
        update={
            "conditions": set_conditions(status.conditions, autoscale.conditions, now),
            "last_decision": autoscale.last_decision,
            "target_ratio": autoscale.target_ratio,
            "pools": pools,
        }
    )


def without_planner(status: InferenceServiceStatus) -> InferenceServiceStatus:
    """``status`` without the planner's fields, for services whose planner does not run."""
    conds = [c for c in status.conditions if c.type not in (METRICS_AVAILABLE, SCALING_LIMITED)]
    recommended = any(p.recommended_replicas is not None for p in status.pools)
    if (
        len(conds) == len(status.conditions)
        and status.last_decision is None
        and status.target_ratio is None
        and not recommended
    ):
        return status
    pools = [p.model_copy(update={"recommended_replicas": None}) for p in status.pools]
    return status.model_copy(
        update={"conditions": conds, "last_decision": None, "target_ratio": None, "pools": pools}
    )


def planner_status(
    status: InferenceServiceStatus, mode: str, autoscale: Autoscale | None, now: str
) -> InferenceServiceStatus:
    """The planner's part of the status: set in ``planner`` and ``recommend`` modes (once it
    decided), removed in the others (a service that leaves them keeps no stale planner conditions),
    and removed too while what the status holds was decided in the other planned mode (the spec
    switched; the operator may hold no decision at all after a restart or a leader change)."""
    if mode not in PLANNED_MODES:
        return without_planner(status)
    autoscale = for_mode(autoscale, mode)
    if autoscale is not None:
        return apply_to_status(status, autoscale, now)
    stored = status.last_decision
    if stored is not None and (stored.mode or "planner") != mode:
        return without_planner(status)
    return status


# ---- the planner's memory across operator restarts (tandem.autoscaler reads and writes it)


def state_configmap(service: str) -> str:
    """The ConfigMap that keeps a service's planner memory across operator restarts (a dot
    cannot appear in a child's name, which joins the service and a pool name with '-')."""
    return f"{service}.planner-state"


def state_manifest(body: Mapping[str, Any], state: PlannerState) -> dict[str, Any]:
    """The state ConfigMap of the service ``body``: owned by it (deleted with it), and without
    the managed-by label, so that neither the reconcile's prune nor the operator's watch of
    its children sees it."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": state_configmap(meta["name"]),
            "namespace": meta.get("namespace") or "default",
            "labels": {names.LABEL_SERVICE: meta["name"], names.LABEL_COMPONENT: "planner-state"},
            "ownerReferences": [
                {
                    "apiVersion": body.get("apiVersion", names.API_VERSION),
                    "kind": body.get("kind", names.KIND_SERVICE),
                    "name": meta["name"],
                    "uid": meta.get("uid"),
                }
            ],
        },
        "data": {"state": state.to_json()},
    }


def restorable(
    cm: Mapping[str, Any], body: Mapping[str, Any], now: float, max_age_s: float
) -> PlannerState | None:
    """The planner memory a state ConfigMap holds, if it belongs to this very service (its
    owner's uid: not a deleted namesake's) and is at most ``max_age_s`` old; else None. A
    memory older than a few intervals is safe too: the planner restarts its scale-down window
    after a gap in its decisions."""
    uid = (body.get("metadata") or {}).get("uid")
    owners = (cm.get("metadata") or {}).get("ownerReferences") or []
    if not uid or not any(o.get("uid") == uid for o in owners):
        return None
    text = (cm.get("data") or {}).get("state") or ""
    state = PlannerState.from_json(text)
    if state.last_time is None or not 0.0 <= now - state.last_time <= max_age_s:
        return None
    return state
