"""kopf registrations only: each handler hands the event to the Controller.

Why watch events instead of kopf's create/update/resume handlers: those persist progress and a
diff base in annotations on the user's object (writes a GitOps tool would see), and kopf timers
add a finalizer that blocks deletion while the operator is down. The reconcile is level-based
anyway, so every event, plus the Controller's own resync loop, simply asks for a reconcile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

import kopf

from tandem import names
from tandem.controller import Controller, Settings
from tandem.kube import Kube

log = logging.getLogger("tandem.handlers")

_OWNED = {names.LABEL_MANAGED_BY: names.MANAGED_BY_VALUE}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # our own Events carry the story; kopf's would duplicate it
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.GROUP)
    # blocking API calls run in threads; the default pool (cores + 4) would serialise a
    # reconcile's concurrent LISTs and applies on a small node
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="tandem-kube")
    )
    controller_settings = memo.get("controller_settings") or Settings()
    controller = Controller(Kube(), controller_settings)
    await asyncio.to_thread(controller.load_pools)
    controller.start_resync()
    memo.controller = controller
    log.info("Started the Tandem controller with %d AcceleratorPools", len(controller.pools))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.stop()


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL_POOL)
async def accelerator_pool_event(event: kopf.RawEvent, name: str, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo.controller
    deleted = event.get("type") == "DELETED"
    spec = None if deleted else (event["object"].get("spec") or {})
    for key in controller.pool_seen(name, spec):
        controller.request(key)


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL_SERVICE)
async def inference_service_event(
    event: kopf.RawEvent, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    controller: Controller = memo.controller
    key = (namespace or "", name)
    controller.service_seen(None if event.get("type") == "DELETED" else event["object"], key)
    controller.request(key)


def _owner_key(labels: kopf.Labels, namespace: str | None) -> tuple[str, str] | None:
    service = labels.get(names.LABEL_SERVICE)
    return (namespace, service) if service and namespace else None


@kopf.on.event("apps", "v1", "deployments", labels=_OWNED)
@kopf.on.event("", "v1", "services", labels=_OWNED)
@kopf.on.event("", "v1", "configmaps", labels=_OWNED)
async def child_event(
    event: kopf.RawEvent,
    labels: kopf.Labels,
    namespace: str | None,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    if event.get("type") is None:
        # kopf re-lists every watched kind at each watch cycle (settings.watching.server_timeout)
        # and replays each object as an event without a type: no child changed, and at fleet
        # scale those replays doubled the steady-state reconciles. What a broken watch missed,
        # the resync catches; the InferenceServices' own re-list still asks for every service.
        return
    kind = body.get("kind")
    key = _owner_key(labels, namespace)
    if key is not None:
        memo.controller.request(key)
        if kind == "Deployment":  # workers came or went: devices allocated on the pools changed
            memo.controller.request_pool_statuses()
