"""Computes an InferenceService's status from what was observed (pure).

Conditions follow the Kubernetes API conventions: keyed by type in a stable order, CamelCase
reasons, sentence messages, ``observedGeneration``, and a ``lastTransitionTime`` that moves only
when the condition's status flips.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from math import gcd
from typing import Any, Literal

from pydantic import ValidationError

from tandem import names
from tandem.models.accelerator_pool import AcceleratorPoolSpec, AcceleratorPoolStatus
from tandem.models.common import Condition, ConditionStatus, StatusModel
from tandem.models.inference_service import (
    InferenceServiceSpec,
    InferenceServiceStatus,
    PoolStatus,
    RoleSummary,
)
from tandem.resolve import Problem, Resolution

CONDITION_ORDER = ("Ready", "Progressing", "Degraded")


def merge_condition(previous: Sequence[Condition], new: Condition, now: str) -> Condition:
    """``new`` with the previous ``lastTransitionTime`` kept unless the status flipped."""
    for old in previous:
        if old.type == new.type and old.status == new.status and old.last_transition_time:
            return new.model_copy(update={"last_transition_time": old.last_transition_time})
    return new.model_copy(update={"last_transition_time": now})


def set_conditions(previous: Sequence[Condition], new: Sequence[Condition], now: str) -> list[Condition]:
    """Replace the conditions in ``new`` by type; keep others (e.g. the planner's) as they were."""
    by_type = {c.type: c for c in previous}
    for cond in new:
        by_type[cond.type] = merge_condition(previous, cond, now)
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(by_type.values(), key=lambda c: (order.get(c.type, len(order)), c.type))


def _cond(type_: str, status: ConditionStatus, reason: str, message: str, generation: int) -> Condition:
    return Condition(
        type=type_, status=status, reason=reason, message=message, observed_generation=generation
    )


def ratio(prefill: int, decode: int) -> str:
    if prefill == 0 and decode == 0:
        return "0:0"
    if prefill == 0 or decode == 0:
        return f"{prefill}:{decode}"
    g = gcd(prefill, decode)
    return f"{prefill // g}:{decode // g}"


def _deployment_counts(dep: Mapping[str, Any] | None) -> tuple[int, int, bool]:
    """(desired, ready, rolled out) of a live Deployment."""
    if dep is None:
        return 0, 0, False
    spec, status = dep.get("spec", {}), dep.get("status", {}) or {}
    desired = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas", 0) or 0)
    updated = int(status.get("updatedReplicas", 0) or 0)
    generation = dep.get("metadata", {}).get("generation", 0)
    rolled_out = (
        status.get("observedGeneration", 0) >= generation
        and updated >= desired
        and ready >= desired
        and int(status.get("replicas", 0) or 0) == desired
    )
    return desired, ready, rolled_out


def compute_status(
    *,
    spec: InferenceServiceSpec,
    generation: int,
    resolution: Resolution,
    deployments: Mapping[str, Mapping[str, Any]],
    router: Mapping[str, Any] | None,
    endpoint: str,
    previous: InferenceServiceStatus,
    now: str,
    extra_problems: Sequence[Problem] = (),
    pods: Sequence[Mapping[str, Any]] = (),
) -> InferenceServiceStatus:
    """The status to write. ``deployments``: pool name -> live Deployment; ``pods``: the
    service's pods (a pool whose pods crash-loop or cannot pull their image is Degraded)."""
    pools: list[PoolStatus] = []
    per_role: dict[str, list[int]] = {"prefill": [0, 0], "decode": [0, 0], "mixed": [0, 0]}
    not_ready: list[str] = []
    rolling: list[str] = []
    for pool in spec.pools:
        dep = deployments.get(pool.name)
        desired, ready, rolled_out = _deployment_counts(dep)
        accel = resolution.accelerator_pools.get(pool.name)
        pools.append(
            PoolStatus(
                name=pool.name,
                role=pool.role,
                accelerator_pool=pool.accelerator_pool,
                vendor=accel.vendor if accel else None,
                desired_replicas=desired,
                ready_replicas=ready,
            )
        )
        per_role[pool.role][0] += ready
        per_role[pool.role][1] += desired
        if dep is None or ready < desired:
            not_ready.append(pool.name)
        if dep is None or not rolled_out:
            rolling.append(pool.name)
    _, _, router_ok = _deployment_counts(router)
    if not router_ok:
        rolling.append("router")
        not_ready.append("router")

    problems = [*resolution.problems, *extra_problems]
    if problems:
        first = problems[0]
        message = " ".join(p.sentence for p in problems)
        ready_c = _cond("Ready", "False", first.reason, message, generation)
        degraded = _cond("Degraded", "True", first.reason, message, generation)
        progressing = _cond(
            "Progressing", "False", first.reason, "Waiting for the spec's problems to be fixed.", generation
        )
    else:
        failing = failing_pools(pods)
        if failing:
            first_reason = next(iter(failing.values()))[0]
            message = " ".join(m for _, m in failing.values())
            degraded = _cond("Degraded", "True", first_reason, message, generation)
        else:
            degraded = _cond(
                "Degraded", "False", "AsExpected", "No pod of a pool is failing to run.", generation
            )
        if not_ready:
            ready_c = _cond(
                "Ready",
                "False",
                "ReplicasNotReady",
                f"Not all replicas are ready: {', '.join(not_ready)}.",
                generation,
            )
        else:
            ready_c = _cond(
                "Ready", "True", "AllReplicasReady", "All pools and the router are ready.", generation
            )
        if rolling:
            progressing = _cond(
                "Progressing", "True", "RollingOut", f"Rolling out: {', '.join(rolling)}.", generation
            )
        else:
            progressing = _cond(
                "Progressing",
                "False",
                "RolloutComplete",
                "Every pool and the router are rolled out.",
                generation,
            )

    summary = RoleSummary(**{role: f"{r}/{d}" for role, (r, d) in per_role.items()})
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": set_conditions(previous.conditions, [ready_c, progressing, degraded], now),
            "pools": pools,
            "replicas": summary,
            "ratio": ratio(per_role["prefill"][1], per_role["decode"][1]),
            "endpoint": endpoint,
        }
    )


# Whether Tandem owns Gateway API Inference Extension InferencePools for the service (and why not).
INFERENCE_POOLS_CONDITION = "InferencePoolsEmitted"
InferencePoolApi = Literal["served", "absent", "forbidden"]


def inference_pools_condition(
    *,
    mode: str,
    api: InferencePoolApi,
    emitted: Sequence[str],
    failed: Mapping[str, str] | None = None,
    generation: int,
) -> Condition:
    """``InferencePoolsEmitted`` from ``spec.routing.inferencePool.mode``, what the operator knows
    of the InferencePool API (``served``; ``absent``: not served; ``forbidden``: served, but the
    operator may not list InferencePools), the InferencePools it wants (``emitted``) and the
    ones the apiserver refused (``failed``: name -> its message). Reasons: ``Emitted`` (True),
    ``Disabled``, ``APINotServed``, ``Forbidden``, ``ApplyFailed``. ``mode: off`` wins: the
    user's choice explains the state whatever the cluster serves."""
    if mode == "off":
        return _cond(
            INFERENCE_POOLS_CONDITION,
            "False",
            "Disabled",
            "spec.routing.inferencePool.mode is off: Tandem owns no InferencePools for this service.",
            generation,
        )
    if api == "absent":
        return _cond(
            INFERENCE_POOLS_CONDITION,
            "False",
            "APINotServed",
            "The cluster does not serve the InferencePool API (inference.networking.k8s.io/v1); "
            "install the Gateway API Inference Extension CRDs to get one InferencePool per role.",
            generation,
        )
    if api == "forbidden":
        return _cond(
            INFERENCE_POOLS_CONDITION,
            "False",
            "Forbidden",
            "The operator may not list InferencePools (inference.networking.k8s.io): grant it list, "
            "create, patch and delete on inferencepools, or set spec.routing.inferencePool.mode to off.",
            generation,
        )
    if failed:
        refusals = "; ".join(f"{name}: {message.rstrip('.')}" for name, message in sorted(failed.items()))
        return _cond(
            INFERENCE_POOLS_CONDITION,
            "False",
            "ApplyFailed",
            f"The apiserver refused {_inference_pools(list(failed))} ({refusals}).",
            generation,
        )
    return _cond(
        INFERENCE_POOLS_CONDITION,
        "True",
        "Emitted",
        f"{_inference_pools(emitted)} {'selects' if len(emitted) == 1 else 'select'} this service's "
        "worker pods by role.",
        generation,
    )


def _inference_pools(names_: Sequence[str]) -> str:
    return f"InferencePool{'' if len(names_) == 1 else 's'} {', '.join(sorted(names_))}"


# Waiting reasons of a container that will not get better by waiting (kubelet's names).
_FAILING = {
    "CrashLoopBackOff": "PoolCrashLooping",
    "ImagePullBackOff": "PoolImagePullFailing",
    "ErrImagePull": "PoolImagePullFailing",
    "InvalidImageName": "PoolImagePullFailing",
    "CreateContainerConfigError": "PoolContainerConfigInvalid",
    "CreateContainerError": "PoolContainerConfigInvalid",
}
# Degraded reasons of pods failing to run (a Warning Event when the service turns to one)
POD_FAILURE_REASONS = frozenset(_FAILING.values())


def failing_pools(pods: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Pool -> (reason, message) for pools with a container stuck in a failing waiting state.

    Pods being deleted are ignored (an old ReplicaSet's crash-looping pods do not count once a
    rollout replaced them). Pools are reported in name order, so the message is stable.
    """
    # pool -> (reason, container, waiting, its last exit, pods)
    found: dict[str, tuple[str, str, str, str, int]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(names.LABEL_POOL)
        if not pool or meta.get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
            if waiting not in _FAILING and _restarting_after_crash(cs):
                waiting = _CRASH_LOOP
            if waiting in _FAILING:
                reason, container, why, exited, count = found.get(
                    pool, (_FAILING[waiting], cs.get("name", "?"), waiting, _last_exit(cs, waiting), 0)
                )
                found[pool] = (reason, container, why, exited, count + 1)
                break
    return {
        pool: (
            reason,
            f"Pool {pool}: {count} pod(s) with container {container} in {why}{exited}; the planner "
            "adds no replicas to it until they become ready.",
        )
        for pool, (reason, container, why, exited, count) in sorted(found.items())
    }


def _last_exit(cs: Mapping[str, Any], waiting: str) -> str:
    """' (last exit: OOMKilled, code 137)' for a crash-looping container whose last
    termination the kubelet reports, else ''. The restart count is left out: it grows with
    every crash and would rewrite the message (and the status) each time."""
    last = (cs.get("lastState") or {}).get("terminated") or {}
    if waiting != _CRASH_LOOP or not last:
        return ""
    parts = [str(last["reason"])] if last.get("reason") else []
    if last.get("exitCode") is not None:
        parts.append(f"code {last['exitCode']}")
    return f" (last exit: {', '.join(parts)})" if parts else ""


_CRASH_LOOP = "CrashLoopBackOff"


def _restarting_after_crash(cs: Mapping[str, Any]) -> bool:
    """Whether a container that is not ready was restarted after it last exited with an error:
    a crash loop between two back-offs (running again, or just terminated). The kubelet reports
    ``waiting: CrashLoopBackOff`` only during the back-off itself, so without this a container
    that runs for a while between crashes (an engine loading weights, then running out of
    memory) turned ``Degraded`` back to ``AsExpected`` and posted its Warning again every cycle.
    One that became ready again has recovered."""
    if cs.get("ready") or not cs.get("restartCount"):
        return False
    last = (cs.get("lastState") or {}).get("terminated") or {}
    state = cs.get("state") or {}
    if "waiting" in state and "running" not in state and "terminated" not in state:
        reason = (state.get("waiting") or {}).get("reason")
        if reason not in (None, "", "PodInitializing", "ContainerCreating"):
            return False  # another waiting state: reported by its own reason, or benign
    return bool(last) and (last.get("exitCode", 0) != 0 or last.get("reason") in ("Error", "OOMKilled"))


# One pool's sentence in a Degraded message of `failing_pools` (container names are DNS labels:
# no dots, so the sentence ends at the first full stop after the waiting reason).
_FAILURE_SENTENCE = re.compile(
    r"Pool (?P<pool>\S+): \d+ pod\(s\) with container \S+ in (?P<why>\w+)(?: \([^)]*\))?;[^.]*\."
)


def stated_failures(message: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(pool, kubelet waiting reason) -> (Degraded reason, the pool's sentence) for every pool
    failure a Degraded message of `failing_pools` states. The pod count is left out of the key:
    a crash-looping pool whose second pod starts crash-looping too is no news."""
    return {
        (m["pool"], m["why"]): (_FAILING[m["why"]], m.group(0))
        for m in _FAILURE_SENTENCE.finditer(message)
        if m["why"] in _FAILING
    }


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: what ``new`` no longer
    has is sent as null, maps are patched key by key, lists replaced. Sending ``new`` alone
    would keep what it dropped (a service leaving planner mode kept its ``lastDecision``, so the
    next reconcile found the status changed and wrote it again, every time). ``old`` should be
    the stored status as this operator reads it (`known`): fields it does not know, a newer
    operator's, are then neither compared nor removed."""
    out: dict[str, Any] = {}
    before = old or {}
    for key, value in new.items():
        prev = before.get(key)
        if isinstance(value, Mapping) and isinstance(prev, Mapping):
            out[key] = merge_patch(prev, value)
        else:
            out[key] = value
    for key in before:
        if key not in new:
            out[key] = None
    return out


def known(model: type[StatusModel], raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """``raw`` status as this operator's ``model`` reads it back (unknown fields dropped at every
    depth, as the model ignores them); {} for none or one it cannot read (nothing of it is then
    removed: the new status is written over it)."""
    if not raw:
        return {}
    try:
        return model.model_validate(raw).to_wire()
    except ValidationError:
        return {}


def status_patch(
    model: type[StatusModel], raw: Mapping[str, Any] | None, new: StatusModel
) -> dict[str, Any] | None:
    """The merge patch that writes ``new`` over the stored status ``raw`` (read as `known`), or
    None when they are the same, so that an unchanged status is never written again."""
    stored, wire = known(model, raw), new.to_wire()
    return None if stored == wire else merge_patch(stored, wire)


def status_changed(old: Mapping[str, Any] | None, new: InferenceServiceStatus) -> bool:
    """Whether ``new`` differs from the stored ``old`` (fields this operator does not know, a
    newer one's, are neither compared nor removed)."""
    return status_patch(InferenceServiceStatus, old, new) is not None


def _quantity_int(value: Any) -> int:
    """Device counts are whole numbers; "1k" style suffixes appear on shared RDMA resources."""
    text = str(value)
    for suffix, factor in (("k", 1000), ("Ki", 1024), ("M", 1000**2), ("Mi", 1024**2)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    try:
        return int(float(text))
    except ValueError:
        return 0


def compute_pool_status(
    *,
    spec: AcceleratorPoolSpec,
    generation: int,
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    previous: AcceleratorPoolStatus,
    now: str,
) -> AcceleratorPoolStatus:
    """Matching nodes, allocatable and allocated devices of one AcceleratorPool.

    ``pods``: every pod bound to a node that is not finished; allocated devices are the
    requests of the pool's device resource on the matching nodes, whoever owns the pods.
    """
    resource = spec.effective_resource_name()
    selector = spec.node_selector
    matching = [
        n
        for n in nodes
        if all((n.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in selector.items())
        and not (n.get("spec") or {}).get("unschedulable")
    ]
    names = {n["metadata"]["name"] for n in matching}
    allocatable = sum(
        _quantity_int((n.get("status") or {}).get("allocatable", {}).get(resource, 0)) for n in matching
    )
    allocated = 0
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName") not in names:
            continue
        for c in pod["spec"].get("containers", []):
            allocated += _quantity_int(((c.get("resources") or {}).get("requests") or {}).get(resource, 0))
    if matching and allocatable:
        ready = _cond(
            "Ready",
            "True",
            "NodesAvailable",
            f"{len(matching)} nodes with {allocatable} {resource}.",
            generation,
        )
    elif matching:
        ready = _cond("Ready", "False", "NoDevices", f"The matching nodes expose no {resource}.", generation)
    else:
        ready = _cond(
            "Ready", "False", "NoMatchingNodes", "No schedulable node matches the nodeSelector.", generation
        )
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "matching_nodes": len(matching),
            "allocatable_devices": allocatable,
            "allocated_devices": allocated,
            "conditions": set_conditions(previous.conditions, [ready], now),
        }
    )


def pool_status_update(
    body: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any] | None:
    """The AcceleratorPool status to write (a merge patch), or None when it is unchanged or the
    spec unreadable."""
    raw = body.get("status") or {}
    try:
        spec = AcceleratorPoolSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
    previous = AcceleratorPoolStatus.model_validate(raw) if raw else AcceleratorPoolStatus()
    new = compute_pool_status(
        spec=spec,
        generation=int(body["metadata"].get("generation", 1)),
        nodes=nodes,
        pods=pods,
        previous=previous,
        now=now,
    )
    return status_patch(AcceleratorPoolStatus, raw, new)
