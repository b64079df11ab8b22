"""The autoscaling loop for ``autoscaling.mode: planner`` and ``recommend`` (I/O orchestration only).

One loop ticks every second over the services the Controller knows; each service in planner or
recommend mode whose interval has passed gets one step, run as its own task (a slow Prometheus
for one service delays no other):

1. gather: the pools' Deployments (replica counts) and a Prometheus read
   (:func:`tandem.metrics.read_observation`, in a thread, every query with a timeout);
2. decide: :func:`tandem.planner.decide` (pure), with the state kept here in memory;
3. store the result as a :class:`tandem.scaling.Autoscale` and, if it differs from the last,
   ask the Controller for a reconcile, which applies replicas and the split threshold (planner
   mode; recommend mode only reports them) and writes the status. The planner never writes a
   Deployment itself.

Missing data never scales anything down: the planner holds on incomplete readings, and when
Prometheus cannot be read at all the step does not call the planner (``MetricsAvailable=False``,
reason ``PrometheusUnavailable``). The planner's memory (scale-down window, corrections,
forecasts, error budget, burst memory) lives in the operator and, every ``persist_seconds``, in
the ConfigMap ``<service>.planner-state`` the service owns. After a restart, or on the replica
that takes over, the first decision starts from it when it is this service's and at most the
error budget's window (``slo_window_s``) old; else the planner starts afresh from the replicas
that run. Either way a pause of more than ``gap_intervals`` restarts the scale-down window, so
nothing goes down before a whole window was watched after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tandem import names
from tandem.builders import owned_labels
from tandem.kube import Kube, KubeError
from tandem.metrics import PromClient, connect, read_observation
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec
from tandem.planner import Decision, PlannerSpec, PlannerState, Tuning, decide, planner_spec
from tandem.planner.core import met_share
from tandem.scaling import (
    PLANNED_MODES,
    PROMETHEUS_NOT_CONFIGURED,
    PROMETHEUS_UNAVAILABLE,
    WARNING_REASONS,
    Autoscale,
    after_decision,
    after_hold,
    as_recommendation,
    holding,
    pool_readings,
    restorable,
    state_configmap,
    state_manifest,
    tuning_from,
)
from tandem.telemetry import (
    LIMITS,
    PLANNER_ATTAINMENT_TARGET,
    PLANNER_DECISIONS,
    PLANNER_DESIRED_REPLICAS,
    PLANNER_HOLDING,
    PLANNER_LIMITED,
    PLANNER_READ_SECONDS,
    PLANNER_SPLIT_THRESHOLD,
    PLANNER_TTFT_WITHIN_TARGET,
)

log = logging.getLogger("tandem.autoscaler")

Key = tuple[str, str]  # namespace, name
PostEvent = Callable[[Kube, Mapping[str, Any], str, str, str], None]


@dataclass(frozen=True)
class AutoscalerSettings:
    prometheus_url: str | None = None  # used when spec.autoscaling.prometheusUrl is not set
    query_timeout_seconds: float = 5.0  # per PromQL query (client and server side)
    tick_seconds: float = 1.0
    tuning: Tuning = field(default_factory=Tuning)  # defaults; annotations override per service
    # how often, at most, a service's planner memory is written to its state ConfigMap (0: never)
    persist_seconds: float = 120.0


def window_seconds(interval_s: float) -> float:
    """The rate window of a read: two intervals, so every read overlaps the previous one."""
    return 2.0 * interval_s


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stored_reason(body: Mapping[str, Any]) -> str | None:
    """The reason of ``status.lastDecision`` as stored (None when there is none)."""
    last = (body.get("status") or {}).get("lastDecision")
    reason = last.get("reason") if isinstance(last, Mapping) else None
    return reason if isinstance(reason, str) and reason else None


def _switch_mode(st: _Service, mode: str) -> None:
    """planner <-> recommend (after_decision ignores the other mode's Autoscale): the router
    runs the spec's threshold after recommend (its own was never applied)."""
    if st.mode is not None and st.mode != mode:
        st.recommendation = None
        if mode == "planner":
            st.state = dataclasses.replace(st.state, split_threshold=None, route_changed=None)
    st.mode = mode


# A Warning reason posts again only after this long (the planner's default scale-down window):
# a situation that comes and goes every other interval must not post an Event each time.
WARNING_REPEAT_S = 600.0


@dataclass
class _Service:
    state: PlannerState = field(default_factory=PlannerState)
    autoscale: Autoscale | None = None
    due: float = 0.0
    task: asyncio.Task[None] | None = None
    read: asyncio.Future[Any] | None = None  # a Prometheus read in its thread
    gauged: set[str] = field(default_factory=set)  # pools with a desired-replicas gauge
    reasons: set[str] = field(default_factory=set)  # reasons counted for this service
    mode: str | None = None  # the autoscaling mode of the last step
    recommendation: tuple[Any, ...] | None = None  # recommend mode: the last one an Event told
    warned: dict[str, float] = field(default_factory=dict)  # Warning reason -> when last posted
    restored: bool = False  # the state ConfigMap was read (once, before the first decision)
    persisted: float | None = None  # when the state was last written to it


class Autoscaler:
    """Per-service planner state and the loop that feeds it. ``services`` and ``pools`` are the
    Controller's live views (read only); ``request`` asks it for a reconcile."""

    def __init__(
        self,
        kube: Kube,
        services: Mapping[Key, Mapping[str, Any]],
        pools: Mapping[str, Mapping[str, Any]],
        request: Callable[[Key], None],
        post_event: PostEvent,
        settings: AutoscalerSettings | None = None,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.kube = kube
        self.active = active  # a standby replica (peering) reads and decides nothing
        self.services = services
        self.pools = pools
        self.request = request
        self.post_event = post_event
        self.settings = settings or AutoscalerSettings()
        self._state: dict[Key, _Service] = {}
        self._clients: dict[str, PromClient] = {}
        self._loop: asyncio.Task[None] | None = None

    # the Controller's view
    def current(self, key: Key) -> Autoscale | None:
        st = self._state.get(key)
        return st.autoscale if st else None

    def forget(self, key: Key) -> None:
        st = self._state.pop(key, None)
        if st is not None and st.task is not None:
            st.task.cancel()
        for pool in st.gauged if st is not None else ():
            with contextlib.suppress(KeyError):
                PLANNER_DESIRED_REPLICAS.remove(*key, pool)
        with contextlib.suppress(KeyError):
            PLANNER_SPLIT_THRESHOLD.remove(*key)
        self._clear_alerting(key)
        for reason in st.reasons if st is not None else ():
            with contextlib.suppress(KeyError):
                PLANNER_DECISIONS.remove(*key, reason)

    @staticmethod
    def _clear_alerting(key: Key, *, keep: tuple[Any, ...] = ()) -> None:
        """Remove the per-service gauges the alerts read (those in ``keep`` stay): a planner that
        does not run, or cannot read its metrics, has no current value to export."""
        gauges = (PLANNER_HOLDING, PLANNER_TTFT_WITHIN_TARGET, PLANNER_ATTAINMENT_TARGET)
        for gauge in (g for g in gauges if g not in keep):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)
        for by in LIMITS:
            with contextlib.suppress(KeyError):
                PLANNER_LIMITED.remove(*key, by)

    def forget_all(self) -> None:
        """Drop every service's state (this replica takes over as the active one: what it decided
        in an earlier term is stale, and the modes may have changed meanwhile)."""
        for key in list(self._state):
            self.forget(key)

    # the loop
    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in [self._loop, *(s.task for s in self._state.values())] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._loop = None

    async def _run(self) -> None:
        while True:
            try:
                self.tick(time.monotonic())
            except Exception:  # never stops the loop
                log.exception("Autoscaler tick failed")
            await asyncio.sleep(self.settings.tick_seconds)

    def tick(self, mono: float) -> None:
        """Starts a step for every planner- or recommend-mode service whose interval has passed."""
        if not self.active():
            return
        planned = {k for k, body in self.services.items() if _mode(body) in PLANNED_MODES}
        for key in [k for k in self._state if k not in planned]:
            self.forget(key)
        for key in planned:
            st = self._state.setdefault(key, _Service())
            if st.task is not None and not st.task.done():
                continue
            if mono < st.due:
                continue
            body = self.services[key]
            st.due = mono + _interval(body)
            st.task = asyncio.create_task(self._step_logged(key, body))

    async def _step_logged(self, key: Key, body: Mapping[str, Any]) -> None:
        try:
            await self.step(key, body)
        except KubeError as exc:
            log.warning("Autoscaling step of %s/%s failed: %s", *key, exc)
        except Exception:
            log.exception("Autoscaling step of %s/%s failed", *key)

    # one step
    async def step(self, key: Key, body: Mapping[str, Any], now: float | None = None) -> Autoscale | None:
        """Gathers, decides and stores one decision for ``key``; returns the new Autoscale
        (``None`` when there is nothing to decide yet: invalid spec, unresolved pools, no Deployments)."""
        namespace, name = key
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation", 1))
        try:
            spec = InferenceServiceSpec.model_validate(body.get("spec") or {})
            accel = {
                p.accelerator_pool: AcceleratorPoolSpec.model_validate(self.pools[p.accelerator_pool])
                for p in spec.pools
            }
            pspec = planner_spec(spec, accel, tuning_from(meta.get("annotations"), self.settings.tuning))
        except (ValidationError, KeyError, ValueError):
            self._clear_alerting(key)  # the planner does not run: its gauges would be stale
            return None  # the reconcile reports what is wrong with the spec
        st = self._state.setdefault(key, _Service())
        mode = spec.autoscaling.mode
        _switch_mode(st, mode)
        items = await asyncio.to_thread(self.kube.list_objects, "Deployment", namespace, owned_labels(name))
        deployments = {
            d["metadata"]["labels"][names.LABEL_POOL]: d
            for d in items
            if d["metadata"].get("labels", {}).get(names.LABEL_POOL)
        }
        observation = pool_readings(spec, deployments, {})
        if observation is None:
            self._clear_alerting(key)
            return None  # not created yet
        current = {pool: r.replicas for pool, r in observation.pools.items()}
        stamp = utcnow()

        url = spec.autoscaling.prometheus_url or self.settings.prometheus_url
        if url is None:
            return await self._hold(key, body, generation, PROMETHEUS_NOT_CONFIGURED, _NO_URL, stamp, now)
        metrics = await self._read(st, url, key, spec, pspec.interval_s)
        if metrics is None or any(not m.complete for m in metrics.values()):
            message = f"Could not read the pools' metrics from {url}; holding every pool."
            return await self._hold(key, body, generation, PROMETHEUS_UNAVAILABLE, message, stamp, now)
        observation = pool_readings(spec, deployments, metrics)
        assert observation is not None
        recommend = mode == "recommend"
        moment = time.time() if now is None else now
        if not st.restored:  # the first decision since this operator started, or took over
            st.restored = True
            await self._restore(key, body, st, pspec, moment)
        state = st.state
        if recommend:  # the router keeps the spec's threshold: the planner's was never applied
            state = dataclasses.replace(state, split_threshold=None, route_changed=None)
        decision = decide(pspec, observation, state, moment)
        st.state = decision.state
        await self._persist(key, body, st, moment)
        post = bool(decision.changes(current)) or decision.split_threshold is not None
        if holding(decision.reason):  # the metrics could not be trusted (MetricsMissing, ...)
            await self._hold_started(key, body, st, decision.reason, decision.message, moment)
        # the SLO may suffer: a Warning when that starts, even if no replica changes
        warning = decision.reason in WARNING_REASONS
        started = warning and self._starts(st, body, decision.reason, moment)
        if recommend:
            decision = as_recommendation(decision)
        autoscale = after_decision(spec, generation, decision, current, st.autoscale, stamp)
        if recommend:
            # one Event per new recommendation (the pools it would change, the threshold), not
            # one per interval while the replicas stay with whoever sets them
            told = (tuple(sorted(autoscale.recommended.items())), decision.split_threshold)
            post = post and told != st.recommendation
            st.recommendation = told if post else st.recommendation
        post = post or started
        self._record(key, decision, autoscale, current, applied=not recommend, logged=post)
        self._record_slo(key, pspec, decision)
        if post:
            await self._post(body, decision, "Warning" if warning else "Normal")
        return self._store(key, body, autoscale)

    async def _restore(
        self, key: Key, body: Mapping[str, Any], st: _Service, pspec: PlannerSpec, now: float
    ) -> None:
        """Take the planner memory of the state ConfigMap (written before a restart or by the
        replica that was active before this one), if it is this service's and at most
        ``slo_window_s`` old (the longest window of its memory but the burst memory). Any failure
        leaves the fresh state: the planner then starts afresh, as it always could (nothing
        scales down before a whole window was watched)."""
        if self.settings.persist_seconds <= 0:
            return
        namespace, name = key
        query = [("fieldSelector", f"metadata.name={state_configmap(name)}")]
        try:  # a LIST: the chart grants list on ConfigMaps, not get
            page = await asyncio.to_thread(
                self.kube.request, "GET", f"/api/v1/namespaces/{namespace}/configmaps", query=query
            )
        except KubeError as exc:
            log.warning("Could not read the planner state of %s/%s: %s", namespace, name, exc)
            return
        items = page.get("items") or []
        state = restorable(items[0], body, now, pspec.tuning.slo_window_s) if items else None
        if state is not None:
            st.state = state
            st.persisted = now  # what is stored is this memory
            log.info("Restored the planner memory of %s/%s", namespace, name)

    async def _persist(self, key: Key, body: Mapping[str, Any], st: _Service, now: float) -> None:
        """Write the planner memory to the state ConfigMap, at most every ``persist_seconds``.
        A failed write (no permission, say) is logged and tried again ``persist_seconds`` later,
        not at every decision."""
        every = self.settings.persist_seconds
        if every <= 0 or (st.persisted is not None and 0.0 <= now - st.persisted < every):
            return
        st.persisted = now
        try:
            await asyncio.to_thread(self.kube.apply, state_manifest(body, st.state))
        except KubeError as exc:
            log.warning("Could not write the planner state of %s/%s: %s", *key, exc)

    async def _hold(
        self,
        key: Key,
        body: Mapping[str, Any],
        generation: int,
        reason: str,
        message: str,
        stamp: str,
        now: float | None = None,
    ) -> Autoscale:
        """No decision possible: nothing changes but MetricsAvailable (a Warning Event when it flips)."""
        st = self._state.setdefault(key, _Service())
        PLANNER_DECISIONS.labels(*key, reason).inc()
        # the error budget and the limits are not known without metrics; the hold is
        self._clear_alerting(key, keep=(PLANNER_HOLDING, PLANNER_ATTAINMENT_TARGET))
        PLANNER_HOLDING.labels(*key).set(1)
        st.reasons.add(reason)
        await self._hold_started(key, body, st, reason, message, time.time() if now is None else now)
        mode = _mode(body)
        return self._store(key, body, after_hold(generation, reason, message, st.autoscale, stamp, mode))

    async def _read(
        self, st: _Service, url: str, key: Key, spec: InferenceServiceSpec, interval_s: float
    ) -> dict[str, Any] | None:
        """The pools' observations, or None when Prometheus could not be read in time. A read
        still running from an earlier step (a hung server) is not duplicated."""
        if st.read is not None and not st.read.done():
            return None
        timeout = min(self.settings.query_timeout_seconds, max(1.0, interval_s / 2))
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = connect(url, timeout)
        namespace, name = key
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        st.read = loop.run_in_executor(
            None,
            lambda: read_observation(
                client,
                namespace,
                name,
                [p.name for p in spec.pools],
                window_seconds(interval_s),
                timeout_s=timeout,
                engine=spec.engine,
            ),
        )
        try:
            result: dict[str, Any] = await asyncio.wait_for(asyncio.shield(st.read), timeout=interval_s)
        except Exception as exc:  # TimeoutError included
            log.warning("Could not read metrics of %s/%s from %s: %s", namespace, name, url, exc)
            return None
        PLANNER_READ_SECONDS.observe(time.monotonic() - started)
        return result

    def _store(self, key: Key, body: Mapping[str, Any], autoscale: Autoscale) -> Autoscale:
        st = self._state.get(key)
        if st is None or self.services.get(key) is None:
            return autoscale  # forgotten meanwhile
        changed = autoscale != st.autoscale
        st.autoscale = autoscale
        if changed:
            self.request(key)
        return autoscale

    def _record(
        self,
        key: Key,
        decision: Decision,
        autoscale: Autoscale,
        current: Mapping[str, int],
        *,
        applied: bool,
        logged: bool,
    ) -> None:
        """Metrics and the log line of a decision: the desired replicas are the planner's own
        (its recommendation in recommend mode); the split threshold gauge only moves when the
        threshold is applied (planner mode)."""
        PLANNER_DECISIONS.labels(*key, decision.reason).inc()
        PLANNER_HOLDING.labels(*key).set(1 if holding(decision.reason) else 0)
        limited = {
            "budget": decision.limited_by == "budget" or decision.reason == "BudgetLimited",
            "max": decision.limited_by == "max",
            "infeasible": decision.reason == "SloInfeasible",
        }
        for by in LIMITS:
            PLANNER_LIMITED.labels(*key, by).set(1 if limited[by] else 0)
        st = self._state.get(key)
        if st is not None:
            st.reasons.add(decision.reason)
        wanted = autoscale.replicas if applied else autoscale.recommended
        for pool, replicas in current.items():
            PLANNER_DESIRED_REPLICAS.labels(*key, pool).set(wanted.get(pool, replicas))
            if st is not None:
                st.gauged.add(pool)
        if applied and autoscale.split_threshold is not None:
            PLANNER_SPLIT_THRESHOLD.labels(*key).set(autoscale.split_threshold)
        if logged:
            log.info("Planner decided for %s/%s: %s %s", *key, decision.reason, decision.message)

    def _record_slo(self, key: Key, pspec: PlannerSpec, decision: Decision) -> None:
        """The error budget the planner read (for alerting on the SLO): the share of first tokens
        within the TTFT target, absent while too few were seen, beside the attainment target."""
        PLANNER_ATTAINMENT_TARGET.labels(*key).set(pspec.attainment)
        share = met_share(pspec, decision.state)
        if share is None:
            with contextlib.suppress(KeyError):
                PLANNER_TTFT_WITHIN_TARGET.remove(*key)
        else:
            PLANNER_TTFT_WITHIN_TARGET.labels(*key).set(share)

    @staticmethod
    def _starts(st: _Service, body: Mapping[str, Any], reason: str, now: float) -> bool:
        """Whether a decision (or a hold) for ``reason`` starts a situation worth a Warning: the
        last decision had another reason, and no Warning for ``reason`` went out in the last
        ``WARNING_REPEAT_S`` (a reason that comes back every other interval, such as an SLO out
        of reach on sparse traffic, would otherwise post one a minute). Records the post.

        Before this operator's first decision for the service (it restarted, or took over as
        the active replica) the last decision is the one the status holds: a situation that
        lasts through a restart was told already."""
        if st.autoscale is not None:
            previous = st.autoscale.last_decision.reason if st.autoscale.last_decision else None
        else:
            previous = _stored_reason(body)
        if previous == reason:
            return False
        last = st.warned.get(reason)
        if last is not None and 0.0 <= now - last < WARNING_REPEAT_S:
            return False
        st.warned[reason] = now
        return True

    async def _hold_started(
        self, key: Key, body: Mapping[str, Any], st: _Service, reason: str, message: str, now: float
    ) -> None:
        """A Warning Event and a log line when a hold for ``reason`` starts."""
        if not self._starts(st, body, reason, now):
            return
        log.warning("Planner of %s/%s is holding: %s", *key, message)
        try:
            await asyncio.to_thread(self.post_event, self.kube, body, "Warning", reason, message)
        except KubeError as exc:
            log.warning("Could not post Event %s: %s", reason, exc)

    async def _post(self, body: Mapping[str, Any], decision: Decision, type_: str) -> None:
        message = decision.message
        if decision.split_threshold is not None:
            message = f"{message} Split threshold: {decision.split_threshold} prompt tokens."
        try:
            await asyncio.to_thread(self.post_event, self.kube, body, type_, decision.reason, message)
        except KubeError as exc:
            log.warning("Could not post Event %s: %s", decision.reason, exc)


_NO_URL = "No Prometheus URL: set spec.autoscaling.prometheusUrl or the operator's --prometheus-url."


def _mode(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "deleting"
    return str(((body.get("spec") or {}).get("autoscaling") or {}).get("mode", "off"))


def _interval(body: Mapping[str, Any]) -> float:
    raw = ((body.get("spec") or {}).get("autoscaling") or {}).get("intervalSeconds", 30)
    try:
        return max(5.0, float(raw))
    except (TypeError, ValueError):
        return 30.0
