"""One level-based reconcile of an InferenceService: gather -> decide -> build -> apply -> report.

Create, update, resume, child changes and the periodic resync all end up in ``reconcile``; the
controller serialises it per object. Only this module and ``tandem.kube`` do I/O for it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tandem import kv_probe, names
from tandem.builders import (
    INFERENCE_POOL_KIND,
    Images,
    ServiceContext,
    desired_objects,
    owned_labels,
    router_endpoint,
)
from tandem.builders.kv import PairProblem, blocked_pools, check_compatibility
from tandem.builders.router import router_name
from tandem.children import key_of, plan_changes, replicas_handovers
from tandem.kube import OWNED_KINDS, Kube, KubeError
from tandem.kv_status import kv_condition_from_pods
from tandem.models.common import Condition
from tandem.models.inference_service import InferenceServiceSpec, InferenceServiceStatus
from tandem.planner import base_replicas
from tandem.resolve import Problem, Resolution, resolve
from tandem.scaling import Autoscale, for_mode, planner_status
from tandem.status import (
    InferencePoolApi,
    compute_status,
    inference_pools_condition,
    set_conditions,
    status_patch,
)

log = logging.getLogger("tandem.reconcile")


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")


@dataclass
class Outcome:
    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    status_written: bool = False
    # the Ready condition's (reason, message) before and after: a spec problem's Warning Event is
    # posted when it changes (a second, different problem with the same reason, InvalidSpec after
    # InvalidSpec, is news), not again on every resync while it stays
    ready_before: tuple[str, str] | None = None
    ready_after: tuple[str, str] | None = None
    # the Degraded condition's reason before and after, and its message before and after: each
    # pool whose pods fail to run (crash loops, image pulls) gets a Warning Event when the message
    # first states it (`status.stated_failures`), not again while it stays
    degraded_before: str | None = None
    degraded_after: str | None = None
    degraded_message: str = ""
    degraded_told: str = ""
    # KVTransferReady's (reason, message) before and after (as for Ready: a pair incompatible for
    # another reason, or another pair, is news), and the incompatible prefill/decode pairs
    kv_before: tuple[str, str] | None = None
    kv_after: tuple[str, str] | None = None
    kv_problems: list[PairProblem] = field(default_factory=list)
    # children the apiserver refused (400/422): Ready=False/ChildRejected until the spec changes
    rejected: list[Problem] = field(default_factory=list)
    # InferencePools the apiserver refused (name -> its message): reported, never fatal
    inference_pool_failures: dict[str, str] = field(default_factory=dict)
    # the InferencePool API as this reconcile found it ("absent" after the controller's discovery
    # said served: the CRD went away, so the controller looks again)
    inference_pool_api: InferencePoolApi = "absent"
    # the operator may not list PodDisruptionBudgets here: none is applied or pruned
    pdbs_forbidden: bool = False


def _condition(status: InferenceServiceStatus, kind: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def _said(status: InferenceServiceStatus, kind: str) -> tuple[str, str] | None:
    """What the condition of type ``kind`` says: (reason, message)."""
    c = _condition(status, kind)
    return (c.reason, c.message) if c else None


def _blocking_pairs(spec: InferenceServiceSpec, resolution: Resolution) -> list[PairProblem]:
    """The incompatible prefill/decode pairs of a pool that is not rolled out for them."""
    if not resolution.ok:
        return []
    pairs = check_compatibility(spec, resolution.accelerator_pools)
    blocked = blocked_pools(spec, pairs)
    return [p for p in pairs if p.prefill_pool in blocked or p.decode_pool in blocked]


def _invalid_spec(exc: ValidationError) -> Problem:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return Problem("InvalidSpec", f"the spec cannot be read: {detail}")


async def reconcile(
    body: Mapping[str, Any],
    *,
    kube: Kube,
    pools: Mapping[str, Mapping[str, Any]],
    images: Images,
    now: str | None = None,
    autoscale: Autoscale | None = None,
    inference_pools: bool = False,
    probe_kv_sidecars: bool = False,
) -> Outcome:
    """``autoscale``: the planner's latest decision for this service, applied through this same
    path in ``autoscaling.mode: planner`` (replicas, the router's split threshold, status fields)
    and reported only, in the status, in ``recommend``.
    ``inference_pools``: API discovery says the cluster serves GIE's InferencePool; its objects are
    then listed, applied and pruned with the other children (``routing.inferencePool.mode: off``
    prunes them), and ``InferencePoolsEmitted`` reports the outcome. A failure to list them (the
    API gone since discovery, RBAC without them) only keeps them out of this reconcile."""
    planned = autoscale or Autoscale(replicas={})
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = int(meta.get("generation", 1))
    raw_status = body.get("status") or {}
    previous = InferenceServiceStatus.model_validate(raw_status) if raw_status else InferenceServiceStatus()
    degraded_before = _said(previous, "Degraded")
    outcome = Outcome(
        ready_before=_said(previous, "Ready"),
        degraded_before=degraded_before[0] if degraded_before else None,
        degraded_told=degraded_before[1] if degraded_before else "",
    )
    now = now or utcnow()

    # gather
    observed: list[dict[str, Any]] = []
    # one LIST per owned kind, concurrently: they are independent and dominate a no-op reconcile
    listed = await asyncio.gather(
        *(
            asyncio.to_thread(kube.list_objects, kind, namespace, owned_labels(name))
            for kind in OWNED_KINDS
            if kind != PDB_KIND
        ),
        _list_disruption_budgets(kube, namespace, name, outcome),
        _list_inference_pools(kube, namespace, name, outcome) if inference_pools else _none(),
        asyncio.to_thread(kube.list_objects, "Pod", namespace, {names.LABEL_SERVICE: name}),
    )
    pods = listed[-1]  # their KV sidecars' readiness
    # what the not-ready KV sidecars say they run (pod status says only "not ready")
    readyz = await kv_probe.ask(kv_probe.to_ask(pods)) if probe_kv_sidecars else None
    for items in listed[:-1]:
        observed += items
    observed = [o for o in observed if _owned_by(o, uid)]
    live_deployments = {
        o["metadata"]["labels"].get(names.LABEL_POOL, ""): o
        for o in observed
        if o["kind"] == "Deployment" and o["metadata"]["labels"].get(names.LABEL_POOL)
    }

    # decide
    spec: InferenceServiceSpec | None
    try:
        spec = InferenceServiceSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        spec = None
        resolution = Resolution(problems=[_invalid_spec(exc)])
    else:
        resolution = resolve(spec, pools)
        autoscale = for_mode(autoscale, spec.autoscaling.mode)  # decided under the spec's mode
        planned = autoscale or Autoscale(replicas={})
    outcome.problems = list(resolution.problems)  # + the children the apiserver rejects, below

    # build + apply (only when every reference resolved: a half-understood spec changes nothing)
    router_live = next(
        (o for o in observed if o["kind"] == "Deployment" and o["metadata"]["name"] == router_name(name)),
        None,
    )
    desired: list[dict[str, Any]] = []
    if spec is not None and resolution.ok:
        ctx = ServiceContext(
            name=name,
            namespace=namespace,
            uid=uid,
            spec=spec,
            accelerator_pools=resolution.accelerator_pools,
            replicas=base_replicas(spec, live_deployments, planned.replicas),
            images=images,
        )
        served = outcome.inference_pool_api == "served"
        # the planner's threshold reaches the router in planner mode only (recommend reports it)
        threshold = planned.split_threshold if spec.autoscaling.mode == "planner" else None
        desired = _permitted(desired_objects(ctx, threshold, inference_pools=served), outcome)
        to_apply, to_prune = plan_changes(desired, observed)
        to_apply = await _hand_over_replicas(kube, desired, observed, to_apply)
        router_live = await _apply_waves(kube, to_apply, outcome, live_deployments, router_live)
        outcome.problems += outcome.rejected
        for obj in to_prune:
            try:
                await asyncio.to_thread(kube.delete, obj["kind"], obj["metadata"]["name"], namespace)
            except KubeError as exc:
                if obj["kind"] != INFERENCE_POOL_KIND:
                    raise
                log.warning("Could not prune %s: %s", describe(obj), exc)  # optional: the resync retries
                continue
            outcome.pruned.append(describe(obj))
            log.info("Pruned %s", describe(obj))
            pool = obj["metadata"]["labels"].get(names.LABEL_POOL)
            if obj["kind"] == "Deployment" and pool:
                live_deployments.pop(pool, None)

    # report
    if spec is None:
        status = previous.model_copy(update={"observed_generation": generation})
        problem = resolution.problems[0]
        conds = [
            Condition(
                type="Ready",
                status="False",
                reason=problem.reason,
                message=problem.sentence,
                observed_generation=generation,
            ),
            Condition(
                type="Degraded",
                status="True",
                reason=problem.reason,
                message=problem.sentence,
                observed_generation=generation,
            ),
            Condition(  # as for the other spec problems: waiting, not rolling out
                type="Progressing",
                status="False",
                reason=problem.reason,
                message="Waiting for the spec's problems to be fixed.",
                observed_generation=generation,
            ),
        ]
        status = status.model_copy(update={"conditions": set_conditions(previous.conditions, conds, now)})
    else:
        status = compute_status(
            spec=spec,
            generation=generation,
            resolution=resolution,
            deployments=live_deployments,
            router=router_live,
            endpoint=router_endpoint(name, namespace),
            previous=previous,
            now=now,
            # a pool left without any KV-compatible counterpart is not rolled out: the service
            # waits for a fix rather than "rolling out" (its Warning Event comes with
            # KVTransferReady, below); pairs with other working counterparts only show there
            extra_problems=[*outcome.rejected, *_blocking_pairs(spec, resolution)],
            pods=pods,
        )
        status = planner_status(status, spec.autoscaling.mode, autoscale, now)  # tandem.scaling
        if resolution.ok:
            kv, outcome.kv_problems = kv_condition_from_pods(
                spec, resolution.accelerator_pools, pods, generation, readyz
            )
            outcome.kv_before = _said(previous, kv.type)
            outcome.kv_after = (kv.reason, kv.message)
            gie = inference_pools_condition(
                mode=spec.routing.inference_pool.mode,
                api=outcome.inference_pool_api,
                emitted=[m["metadata"]["name"] for m in desired if m["kind"] == INFERENCE_POOL_KIND],
                failed=outcome.inference_pool_failures,
                generation=generation,
            )
            status = status.model_copy(
                update={"conditions": set_conditions(status.conditions, [kv, gie], now)}
            )
    outcome.ready_after = _said(status, "Ready")
    degraded = _condition(status, "Degraded")
    outcome.degraded_after, outcome.degraded_message = (
        (degraded.reason, degraded.message) if degraded else (None, "")
    )
    patch = status_patch(InferenceServiceStatus, raw_status, status)
    if patch is not None:
        await asyncio.to_thread(kube.patch_status, names.KIND_SERVICE, name, namespace, patch)
        outcome.status_written = True
    return outcome


async def _hand_over_replicas(
    kube: Kube, desired: list[dict[str, Any]], observed: list[dict[str, Any]], to_apply: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``to_apply`` for the Deployments whose ``spec.replicas`` Tandem stops setting
    (`children.replicas_handovers`): the handover manager applies the live count first, and the
    Deployment is applied now (if it was not to be) so that Tandem's field manager releases the
    field at once. One that changed since it was read (409: an HPA scaled it) is left out of this
    reconcile, Tandem keeping the field, and handed over on the next one."""
    handed: set[tuple[str, str, str]] = set()
    skipped: set[tuple[str, str, str]] = set()
    for manifest in replicas_handovers(desired, observed, names.FIELD_MANAGER):
        try:  # before the apply that drops the field, or it resets to 1
            await asyncio.to_thread(kube.apply, manifest, names.REPLICAS_HANDOVER_MANAGER)
        except KubeError as exc:
            if exc.status != 409:
                raise
            skipped.add(key_of(manifest))
            log.info(
                "Did not hand over the replicas of %s yet: it changed since it was read", describe(manifest)
            )
            continue
        handed.add(key_of(manifest))
        count = manifest["spec"]["replicas"]
        log.info("Kept %s at %s replicas: Tandem stops setting them", describe(manifest), count)
    kept = [d for d in to_apply if key_of(d) not in skipped]
    return kept + [d for d in desired if key_of(d) in handed and d not in kept]


async def _apply_waves(
    kube: Kube,
    to_apply: list[dict[str, Any]],
    outcome: Outcome,
    live_deployments: dict[str, dict[str, Any]],
    router_live: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Applies in concurrent waves: what the workers reference (identity, config, Services) first,
    then the Deployments, so their pods never wait on a missing object, then the InferencePools,
    which nothing of Tandem's needs. Records what was applied in ``outcome`` and the fresh
    Deployments in ``live_deployments``; returns the router's.

    An InferencePool the apiserver refuses, whatever the error (a GIE release whose schema
    differs answers 500 "field not declared in schema"), is recorded in
    ``outcome.inference_pool_failures`` and fails neither the reconcile nor ``Ready``: the
    interop is optional and ``InferencePoolsEmitted`` carries the message."""
    optional = [m for m in to_apply if m["kind"] == INFERENCE_POOL_KIND]
    required = [m for m in to_apply if m["kind"] != INFERENCE_POOL_KIND]
    waves = [
        [m for m in required if m["kind"] != "Deployment"],
        [m for m in required if m["kind"] == "Deployment"],
        optional,
    ]
    failure: BaseException | None = None
    for wave in waves:
        results = await asyncio.gather(
            *(asyncio.to_thread(kube.apply, m) for m in wave), return_exceptions=True
        )
        for manifest, result in zip(wave, results, strict=True):
            if isinstance(result, KubeError) and manifest["kind"] == INFERENCE_POOL_KIND:
                outcome.inference_pool_failures[manifest["metadata"]["name"]] = _refusal(result)
                log.warning("Could not apply %s: %s", describe(manifest), result)
                continue
            if isinstance(result, KubeError) and result.status in (400, 422):
                # the spec yields an object the apiserver refuses (its own validation, a webhook):
                # retrying cannot help, the user has to change the spec; say so in the status
                outcome.rejected.append(_rejection(manifest, result))
                log.warning("The apiserver rejected %s: %s", describe(manifest), result)
                continue
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            outcome.applied.append(describe(manifest))
            log.info("Applied %s", describe(manifest))
            pool = manifest["metadata"]["labels"].get(names.LABEL_POOL)
            if manifest["kind"] == "Deployment":
                if pool:
                    live_deployments[pool] = result
                else:
                    router_live = result
        if failure is not None:
            raise failure
    return router_live


async def _none() -> list[dict[str, Any]]:
    return []


PDB_KIND = "PodDisruptionBudget"
_PDB_WARNED: set[str] = set()  # namespaces whose missing PodDisruptionBudget RBAC was logged


def _permitted(desired: list[dict[str, Any]], outcome: Outcome) -> list[dict[str, Any]]:
    """``desired`` without PodDisruptionBudgets where the operator may not list them (RBAC from
    before Tandem made them): the rest of the service goes on."""
    return [d for d in desired if not (outcome.pdbs_forbidden and d["kind"] == PDB_KIND)]


async def _list_disruption_budgets(
    kube: Kube, namespace: str, service: str, outcome: Outcome
) -> list[dict[str, Any]]:
    """The service's PodDisruptionBudgets. A 403 (RBAC from before Tandem made them: a chart
    with rbac.create=false, or hand-made roles) leaves them out, with a warning once per
    namespace, instead of failing every reconcile."""
    try:
        return await asyncio.to_thread(kube.list_objects, PDB_KIND, namespace, owned_labels(service))
    except KubeError as exc:
        if exc.status != 403:
            raise
        outcome.pdbs_forbidden = True
        if namespace not in _PDB_WARNED:
            _PDB_WARNED.add(namespace)
            log.warning(
                "May not list PodDisruptionBudgets in %s, so the pools get none: grant the operator "
                "list, create, patch and delete on policy/poddisruptionbudgets (%s)",
                namespace,
                exc,
            )
        return []


async def _list_inference_pools(
    kube: Kube, namespace: str, service: str, outcome: Outcome
) -> list[dict[str, Any]]:
    """The service's InferencePools, with what the listing says of the API in ``outcome``: an
    optional API never fails the reconcile of the rest. 404: no longer served (the CRD was
    removed since discovery); 403: the operator's RBAC lacks them (a chart from before this
    feature). Either way nothing is applied or pruned for it this time."""
    try:
        items = await asyncio.to_thread(
            kube.list_objects, INFERENCE_POOL_KIND, namespace, owned_labels(service)
        )
    except KubeError as exc:
        if exc.status not in (403, 404):
            raise
        outcome.inference_pool_api = "absent" if exc.status == 404 else "forbidden"
        (log.info if exc.status == 404 else log.warning)(
            "Could not list the InferencePools of %s/%s, leaving them out: %s", namespace, service, exc
        )
        return []
    outcome.inference_pool_api = "served"
    return items


def _refusal(err: KubeError) -> str:
    message = str(err.body.get("message") or err.reason).strip()
    return message[:600] + "..." if len(message) > 600 else message


def _rejection(manifest: Mapping[str, Any], err: KubeError) -> Problem:
    return Problem("ChildRejected", f"the apiserver rejected {describe(manifest)}: {_refusal(err)}")


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Objects with our labels but another owner (e.g. a re-created service's leftovers) are not ours."""
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs) or not refs
