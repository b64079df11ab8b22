"""The controller's run-time state: what it has seen, per-object serialisation, resync, Events.

kopf handlers (``tandem.handlers``) feed it watch events; it decides when to reconcile which
InferenceService and posts Events about what changed. It holds no decisions of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tandem import crdcheck, names
from tandem.autoscaler import Autoscaler, AutoscalerSettings
from tandem.builders import Images
from tandem.kube import Kube, KubeError
from tandem.peering import PeeringGate, PeeringSettings
from tandem.reconcile import Outcome, reconcile, utcnow
from tandem.status import POD_FAILURE_REASONS, pool_status_update, stated_failures
from tandem.telemetry import (
    CHILD_WRITES,
    CRD_MISSING_FIELDS,
    RECONCILE_ERRORS_IN_A_ROW,
    RECONCILE_SECONDS,
    RECONCILES,
)

log = logging.getLogger("tandem.controller")

Key = tuple[str, str]  # namespace, name


@dataclass
class Settings:
    resync_seconds: float = 60.0
    debounce_seconds: float = 0.2
    images: Images = field(default_factory=Images)
    autoscaler: AutoscalerSettings = field(default_factory=AutoscalerSettings)
    # None: standalone (this replica always acts); else act only where kopf's peering rule says so
    peering: PeeringSettings | None = None
    # ask not-ready KV sidecars (pod IP, port 8200) which transport they run (tandem.kv_probe):
    # needs the pod network, so on in the chart's in-cluster Deployment, off for local runs
    probe_kv_sidecars: bool = False


# How often, at most, API discovery is re-read for optional APIs (GIE's InferencePool): once per
# resync period, and at least this often when the resync is slower.
DISCOVERY_SECONDS = 60.0


class Controller:
    def __init__(self, kube: Kube, settings: Settings | None = None) -> None:
        self.kube = kube
        self.settings = settings or Settings()
        self.services: dict[Key, Mapping[str, Any]] = {}
        self.pools: dict[str, Mapping[str, Any]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._pending: dict[Key, asyncio.Task[None]] = {}
        self._resync: asyncio.Task[None] | None = None
        self._pools_pending: asyncio.Task[None] | None = None
        self._pools_lock = asyncio.Lock()  # one cluster-wide pool-status update at a time
        self.reconciles = 0
        self._gie = False  # the cluster serves GIE's InferencePool (inference_pools_served)
        self._gie_checked: float | None = None
        self._crds_told: dict[str, tuple[str, ...]] = {}  # CRD -> the missing fields last logged
        # kopf pauses a standby replica's watches, not these tasks: they ask the gate
        self.gate = (
            PeeringGate(kube, self.settings.peering, self._peering_changed) if self.settings.peering else None
        )
        # autoscaling.mode planner and recommend (decisions reach the cluster, or the status only,
        # through self.reconcile)
        self.autoscaler = Autoscaler(
            kube,
            self.services,
            self.pools,
            self.request,
            post_event,
            self.settings.autoscaler,
            active=self.active,
        )

    def active(self) -> bool:
        """Whether this replica may act (always, when standalone)."""
        return self.gate is None or self.gate.active

    def _peering_changed(self, active: bool) -> None:
        # either way the autoscaler starts afresh: decisions of an earlier term would be applied
        # as new after a takeover, and a standby must not keep exporting the gauges alerts read
        self.autoscaler.forget_all()
        RECONCILE_ERRORS_IN_A_ROW.clear()  # the active replica's next reconciles set them again
        if active:  # taking over: everything may have changed while another replica acted
            for key in list(self.services):
                self.request(key)
            self.request_pool_statuses()
        # else: requests still waiting out their debounce see the gate closed and do nothing;
        # a reconcile already running finishes (cancelling it could leave half its applies)

    # what the watches tell us
    def load_pools(self) -> None:
        """Reads every AcceleratorPool once at start, so services are not judged on a partial view."""
        for item in self.kube.list_objects(names.KIND_POOL):
            self.pools[item["metadata"]["name"]] = item.get("spec") or {}

    def pool_seen(self, name: str, spec: Mapping[str, Any] | None) -> list[Key]:
        """Records a pool change; returns the services that reference it."""
        if spec is None:
            self.pools.pop(name, None)
        else:
            self.pools[name] = dict(spec)
        return [key for key, body in self.services.items() if name in _pool_refs(body)]

    def service_seen(self, body: Mapping[str, Any] | None, key: Key) -> None:
        if body is None:
            self.services.pop(key, None)
            self._locks.pop(key, None)
            self.autoscaler.forget(key)
            self._forget_reconciles(key)
        else:
            self.services[key] = body

    async def inference_pools_served(self) -> bool:
        """Whether the cluster serves GIE's InferencePool: API discovery, cached and re-read once
        per resync period (at most ``DISCOVERY_SECONDS`` apart), so a CRD installed later is
        picked up by the next resyncs; a failed read keeps the last answer and stops nothing."""
        now = asyncio.get_running_loop().time()
        interval = min(DISCOVERY_SECONDS, self.settings.resync_seconds)
        if self._gie_checked is None or now - self._gie_checked >= interval:
            self._gie_checked = now
            try:
                served = await asyncio.to_thread(self.kube.serves, "InferencePool")
            except Exception as exc:  # an optional API: never a reason to stop reconciling
                log.warning("Could not discover the InferencePool API, keeping %s: %s", self._gie, exc)
            else:
                if served != self._gie:
                    log.info("InferencePool API (inference.networking.k8s.io/v1) served: %s", served)
                self._gie = served
        return self._gie

    # reconciling
    async def reconcile(self, key: Key) -> Outcome | None:
        body = self.services.get(key)
        if body is None:
            return None
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            body = self.services.get(key)  # the newest one seen while waiting
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            self.reconciles += 1
            with RECONCILE_SECONDS.time():
                try:
                    outcome = await reconcile(
                        body,
                        kube=self.kube,
                        pools=self.pools,
                        images=self.settings.images,
                        autoscale=self.autoscaler.current(key),
                        inference_pools=await self.inference_pools_served(),
                        probe_kv_sidecars=self.settings.probe_kv_sidecars,
                    )
                except Exception as exc:
                    RECONCILES.labels("error").inc()
                    if not (isinstance(exc, KubeError) and exc.namespace_gone):  # going: not failing
                        self._count_reconcile(key, failed=True)
                    raise
            if self._gie and outcome.inference_pool_api == "absent":
                self._gie_checked = None  # the API went away since discovery: look again next time
            RECONCILES.labels("problem" if outcome.problems else "ok").inc()
            self._count_reconcile(key, failed=False)
            for what in outcome.applied:
                CHILD_WRITES.labels("apply", what.split(" ", 1)[0]).inc()
            for what in outcome.pruned:
                CHILD_WRITES.labels("prune", what.split(" ", 1)[0]).inc()
        await self._post_events(body, outcome)
        return outcome

    def _count_reconcile(self, key: Key, *, failed: bool) -> None:
        """Per service, the reconciles that failed in a row (TandemReconcileErrors reads it): one
        more on an error, 0 on any other end. Nothing for a service deleted while its reconcile
        ran (``service_seen`` removed its series) nor once this replica went standby
        (``_peering_changed`` cleared them): such a series would never change again."""
        if key not in self.services or not self.active():
            return
        if failed:
            RECONCILE_ERRORS_IN_A_ROW.labels(*key).inc()
        else:
            RECONCILE_ERRORS_IN_A_ROW.labels(*key).set(0)

    @staticmethod
    def _forget_reconciles(key: Key) -> None:
        with contextlib.suppress(KeyError):  # older prometheus-clients raise for a missing one
            RECONCILE_ERRORS_IN_A_ROW.remove(*key)

    def request(self, key: Key) -> None:
        """Asks for a reconcile soon; requests arriving meanwhile are folded into one."""
        if key in self._pending or key not in self.services or not self.active():
            return

        async def run() -> None:
            try:
                await asyncio.sleep(self.settings.debounce_seconds)
                self._pending.pop(key, None)
                if self.active():  # the gate may have closed meanwhile (peering)
                    await self.reconcile(key)
            except KubeError as exc:
                if exc.namespace_gone:
                    log.info("Skipped %s/%s: it or its namespace is being deleted", *key)
                else:
                    log.warning("Reconcile of %s/%s failed, the resync will retry: %s", *key, exc)
            except Exception:  # one bad object must never stop the others
                log.exception("Reconcile of %s/%s failed, the resync will retry", *key)
            finally:
                self._pending.pop(key, None)

        self._pending[key] = asyncio.create_task(run())

    def request_pool_statuses(self) -> None:
        """Asks for the AcceleratorPools' status soon (workers changed); folded like ``request``.

        At most one update runs at a time and at most one more waits: each holds a cluster-wide
        list of nodes and pods, and at fleet scale an update takes longer than the debounce, so
        unserialised updates piled up (hundreds of Deployment events while 500 services became
        Ready grew the operator to gigabytes)."""
        if self._pools_pending is not None or not self.active():
            return

        async def run() -> None:
            try:
                await asyncio.sleep(max(1.0, self.settings.debounce_seconds))
                async with self._pools_lock:
                    self._pools_pending = None  # requests from now on are served by the next run
                    await self.update_pool_statuses()
            except KubeError as exc:
                log.warning("Could not update the AcceleratorPools' status: %s", exc)
            except Exception:
                log.exception("Could not update the AcceleratorPools' status")
            finally:
                if self._pools_pending is asyncio.current_task():
                    self._pools_pending = None

        self._pools_pending = asyncio.create_task(run())

    def start_resync(self) -> None:
        if self.gate is not None:
            self.gate.start()
        if self._resync is None:
            self._resync = asyncio.create_task(self._resync_loop())
        self.autoscaler.start()

    async def stop(self) -> None:
        if self.gate is not None:
            await self.gate.stop()
        await self.autoscaler.stop()
        tasks = [t for t in [self._resync, self._pools_pending, *self._pending.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _resync_loop(self) -> None:
        while True:
            try:
                if self.active():
                    async with self._pools_lock:
                        await self.update_pool_statuses()
            except Exception:  # reported, retried next period; never stops the loop
                log.exception("Could not update the AcceleratorPools' status")
            try:
                await asyncio.to_thread(self.check_crds)
            except Exception:  # reported, retried next period
                log.exception("Could not compare the cluster's CRDs with this operator's")
            await asyncio.sleep(self.settings.resync_seconds)
            for key in list(self.services):
                self.request(key)  # a standby replica's requests are ignored

    def check_crds(self) -> dict[str, list[str]]:
        """Compare the cluster's CRDs with this operator's (`tandem.crdcheck`): set the gauge
        ``tandem_crd_missing_fields`` per CRD and log a warning when the fields a CRD lacks
        change (once, not every resync). A CRD that cannot be read (absent, or no permission to
        list CRDs) is left unreported. Returns CRD -> missing fields, for those read."""
        found: dict[str, list[str]] = {}
        for name, expected in crdcheck.expected_crds().items():
            try:
                page = self.kube.request(
                    "GET",
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                    query=[("fieldSelector", f"metadata.name={name}")],
                )
            except KubeError as exc:
                log.debug("Could not read CRD %s: %s", name, exc)
                continue
            items = page.get("items") or []
            if not items:
                continue
            missing = crdcheck.missing_fields(items[0], expected)
            found[name] = missing
            CRD_MISSING_FIELDS.labels(name).set(len(missing))
            if tuple(missing) != self._crds_told.get(name, ()):
                if missing:
                    log.warning("%s", crdcheck.summary(name, missing))
                else:
                    log.info("The cluster's CRD %s is current.", name)
            self._crds_told[name] = tuple(missing)
        return found

    async def update_pool_statuses(self) -> int:
        """Recomputes every AcceleratorPool's status from one list of nodes and one of pods;
        writes only those that changed. Returns how many were written."""
        if not self.active():
            return 0
        pools = await asyncio.to_thread(self.kube.list_objects, names.KIND_POOL)
        if not pools:
            return 0
        nodes = await asyncio.to_thread(self.kube.list_objects, "Node")
        pods = await asyncio.to_thread(self.kube.list_running_pods)
        written = 0
        for body in pools:
            result = pool_status_update(body, nodes, pods, utcnow())
            if result is not None:
                name = body["metadata"]["name"]
                try:
                    await asyncio.to_thread(self.kube.patch_status, names.KIND_POOL, name, None, result)
                except KubeError as e:
                    if e.status != 404:
                        raise
                    # deleted since the list: nothing to report, and the other pools still are
                    log.info("Skipped the status of AcceleratorPool %s: it was deleted", name)
                    continue
                written += 1
        return written

    # reporting
    async def _post_events(self, body: Mapping[str, Any], outcome: Outcome) -> None:
        events: list[tuple[str, str, str]] = []
        for what in outcome.applied:
            events.append(("Normal", "Applied", f"Applied {what}."))
        for what in outcome.pruned:
            events.append(("Normal", "Pruned", f"Pruned {what}: no longer in the spec."))
        # a problem whose sentence the condition already stated was posted when it appeared:
        # only the new ones post when the set changes
        if outcome.problems and outcome.ready_after != outcome.ready_before:
            told = outcome.ready_before[1] if outcome.ready_before else ""
            events += [("Warning", p.reason, p.sentence) for p in outcome.problems if p.sentence not in told]
        if outcome.degraded_after in POD_FAILURE_REASONS:
            # one per pool failure the previous Degraded message did not state (a second pool
            # failing for the same reason is news; more pods of a pool already failing are not)
            was_failing = outcome.degraded_before in POD_FAILURE_REASONS
            stated = stated_failures(outcome.degraded_told) if was_failing else {}
            events += [
                ("Warning", reason, sentence)
                for key, (reason, sentence) in stated_failures(outcome.degraded_message).items()
                if key not in stated
            ]
        if outcome.kv_problems and outcome.kv_after != outcome.kv_before:
            told = outcome.kv_before[1] if outcome.kv_before else ""
            # one per incompatible prefill/decode pair not stated before
            events += [
                ("Warning", p.reason, p.sentence) for p in outcome.kv_problems if p.sentence not in told
            ]
        results = await asyncio.gather(
            *(asyncio.to_thread(post_event, self.kube, body, t, r, m) for t, r, m in events),
            return_exceptions=True,
        )
        for (_, reason, _), result in zip(events, results, strict=True):
            if isinstance(result, KubeError):
                log.warning("Could not post Event %s: %s", reason, result)
            elif isinstance(result, BaseException):
                raise result


def post_event(kube: Kube, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    namespace = meta.get("namespace") or "default"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
        "eventTime": now,
        "type": type_,
        "reason": reason,
        "note": message[:1024],
        "action": "Reconcile",
        "reportingController": f"{names.GROUP}/operator",
        "reportingInstance": "tandem-operator",
        "regarding": {
            "apiVersion": body.get("apiVersion", names.API_VERSION),
            "kind": body.get("kind", names.KIND_SERVICE),
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
    }
    kube.request("POST", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", body=event)


def _pool_refs(body: Mapping[str, Any]) -> set[str]:
    return {p.get("acceleratorPool", "") for p in (body.get("spec") or {}).get("pools", [])}
