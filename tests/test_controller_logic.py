"""The controller's scheduling of work (no cluster): pool-status updates are serialised; the
per-service reconcile-error gauge the TandemReconcileErrors alert reads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from helpers import EventKube
from tandem import controller as controller_module
from tandem.controller import Controller, Key, Settings
from tandem.kube import KubeError
from tandem.reconcile import Outcome


class SlowKube:
    """Lists take a while (as at fleet scale); records how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.lists = 0
        self._lock = threading.Lock()

    def list_objects(self, kind: str, *_: Any, **__: Any) -> list[dict[str, Any]]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.lists += kind == "AcceleratorPool"
        time.sleep(0.6)  # an update (3 lists) outlasts the 1 s debounce
        with self._lock:
            self.running -= 1
        if kind == "AcceleratorPool":
            return [
                {
                    "metadata": {"name": "h100", "generation": 1},
                    "spec": {"vendor": "nvidia", "model": "H100-SXM"},
                }
            ]
        return []

    def list_running_pods(self) -> list[dict[str, Any]]:
        return self.list_objects("Pod")

    def patch_status(self, *_: Any) -> dict[str, Any]:
        return {}


def test_pool_status_updates_never_overlap_and_requests_fold() -> None:
    kube = SlowKube()

    async def scenario() -> None:
        controller = Controller(kube, Settings(debounce_seconds=0.0))  # type: ignore[arg-type]
        for _ in range(100):  # a storm of Deployment events, over 3 s
            controller.request_pool_statuses()
            await asyncio.sleep(0.03)
        while controller._pools_pending is not None:
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert kube.most == 1  # one list at a time
    # 100 requests over 3 s, each update taking 1.8 s: folded into a few updates
    assert 1 <= kube.lists <= 4


class GoneKube:
    """Two AcceleratorPools listed; the first is deleted before its status is written."""

    def __init__(self, status: int = 404) -> None:
        self.status = status
        self.patched: list[str] = []

    def list_objects(self, kind: str, *_: Any, **__: Any) -> list[dict[str, Any]]:
        if kind != "AcceleratorPool":
            return []
        return [
            {"metadata": {"name": name, "generation": 1}, "spec": {"vendor": "nvidia", "model": "H100-SXM"}}
            for name in ("gone", "kept")
        ]

    def list_running_pods(self) -> list[dict[str, Any]]:
        return []

    def patch_status(self, kind: str, name: str, *_: Any) -> dict[str, Any]:
        if name == "gone":
            raise KubeError(self.status, "Not Found" if self.status == 404 else "Error", {"message": name})
        self.patched.append(name)
        return {}


def test_a_pool_deleted_since_the_list_is_skipped_and_the_others_still_get_their_status() -> None:
    """A pool deleted between the list and its status write (404) is no error: the update
    goes on with the others. (CI saw one stop the whole update with a traceback.)"""
    kube = GoneKube()
    written = asyncio.run(Controller(kube, Settings()).update_pool_statuses())  # type: ignore[arg-type]
    assert written == 1 and kube.patched == ["kept"]
    # any other failure still surfaces (the resync loop logs it and retries)
    with pytest.raises(KubeError):
        asyncio.run(Controller(GoneKube(500), Settings()).update_pool_statuses())  # type: ignore[arg-type]


class NoGieKube:
    def serves(self, kind: str) -> bool:
        return False


def errors_in_a_row(key: Key) -> float | None:
    labels = {"namespace": key[0], "service": key[1]}
    return REGISTRY.get_sample_value("tandem_reconcile_consecutive_errors", labels)


def test_reconcile_errors_are_gauged_per_service_and_removed_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """TandemReconcileErrors names the failing service and clears once it reconciles or is
    deleted: the gauge counts one service's errors in a row, is 0 after a reconcile that ends
    otherwise, and its series goes with the service (a deleted service must not keep alerting)."""
    broken, fine = ("reconcile-errors", "broken"), ("reconcile-errors", "fine")
    script: list[Exception | Key | None] = []  # per reconcile: raise, delete that service and raise, or end

    async def scripted(body: dict[str, Any], **_: Any) -> Outcome:
        step = script.pop(0)
        if isinstance(step, tuple):  # deleted while its reconcile ran
            controller.service_seen(None, step)
            raise KubeError(500, "InternalError")
        if step is not None:
            raise step
        return Outcome()

    monkeypatch.setattr(controller_module, "reconcile", scripted)
    controller = Controller(NoGieKube(), Settings())  # type: ignore[arg-type]

    def seen(key: Key) -> None:
        controller.service_seen({"metadata": {"namespace": key[0], "name": key[1]}, "spec": {}}, key)

    async def run(key: Key, step: Exception | Key | None) -> None:
        script.append(step)
        with contextlib.suppress(Exception):
            await controller.reconcile(key)

    async def scenario() -> None:
        seen(broken)
        seen(fine)
        await run(fine, None)
        await run(broken, KubeError(500, "InternalError"))
        await run(broken, KubeError(409, "Conflict"))
        assert (errors_in_a_row(broken), errors_in_a_row(fine)) == (2, 0)
        await run(broken, None)  # reconciles fine again
        assert errors_in_a_row(broken) == 0
        await run(broken, KubeError(500, "InternalError"))
        # its namespace is being deleted: no failure of its own, the deletion removes the series
        await run(broken, KubeError(403, "Forbidden", {"message": "because it is being terminated"}))
        assert errors_in_a_row(broken) == 1
        controller.service_seen(None, broken)  # deleted
        assert (errors_in_a_row(broken), errors_in_a_row(fine)) == (None, 0)
        seen(broken)
        await run(broken, broken)  # deleted while its reconcile ran: the series does not come back
        assert errors_in_a_row(broken) is None and script == []
        seen(broken)
        await run(broken, KubeError(500, "InternalError"))
        controller._peering_changed(False)  # gone standby: the active replica exports them now
        assert (errors_in_a_row(broken), errors_in_a_row(fine)) == (None, None)

    asyncio.run(scenario())


def _failing(pool: str, pods: int, why: str) -> str:
    """A pool's sentence as `status.failing_pools` writes it."""
    return (
        f"Pool {pool}: {pods} pod(s) with container engine in {why}; the planner adds no "
        "replicas to it until they become ready."
    )


CRASH_DECODE = _failing("decode", 1, "CrashLoopBackOff")
CRASH_DECODE_2 = _failing("decode", 2, "CrashLoopBackOff")  # another pod of the pool
CRASH_DECODE_OOM = _failing("decode", 1, "CrashLoopBackOff (last exit: OOMKilled, code 137)")


@pytest.mark.parametrize(
    ("before", "after", "posted"),
    [
        # turned to a pod failure: one Warning
        (("AsExpected", "No pod is failing."), ("PoolCrashLooping", CRASH_DECODE), [CRASH_DECODE]),
        # still: no repeat every reconcile, nor when another pod of the pool fails too
        (("PoolCrashLooping", CRASH_DECODE), ("PoolCrashLooping", CRASH_DECODE), []),
        (("PoolCrashLooping", CRASH_DECODE), ("PoolCrashLooping", CRASH_DECODE_2), []),
        # the same crash loop, now stating its last exit (or an operator before it did not)
        (("PoolCrashLooping", CRASH_DECODE), ("PoolCrashLooping", CRASH_DECODE_OOM), []),
        (("AsExpected", "No pod is failing."), ("PoolCrashLooping", CRASH_DECODE_OOM), [CRASH_DECODE_OOM]),
        # another failure of the same pool
        (
            ("PoolCrashLooping", CRASH_DECODE),
            ("PoolImagePullFailing", _failing("decode", 1, "ImagePullBackOff")),
            [_failing("decode", 1, "ImagePullBackOff")],
        ),
        # a second pool failing for the same reason: one Warning, naming it
        (
            ("PoolCrashLooping", CRASH_DECODE),
            ("PoolCrashLooping", CRASH_DECODE + " " + _failing("prefill", 3, "CrashLoopBackOff")),
            [_failing("prefill", 3, "CrashLoopBackOff")],
        ),
        # a spec problem: its Warning comes with Ready
        (("AsExpected", ""), ("ChildRejected", "The apiserver refused a child."), []),
        (None, ("AsExpected", "No pod of a pool is failing to run."), []),
    ],
)
def test_pods_failing_to_run_post_one_warning_per_pool(
    before: tuple[str, str] | None, after: tuple[str, str], posted: list[str]
) -> None:
    from tandem.reconcile import Outcome

    kube = EventKube()
    controller = Controller(kube, Settings())  # type: ignore[arg-type]
    outcome = Outcome(
        degraded_before=before[0] if before else None,
        degraded_told=before[1] if before else "",
        degraded_after=after[0],
        degraded_message=after[1],
    )
    body = {"metadata": {"name": "llama", "namespace": "ns", "uid": "u"}}
    asyncio.run(controller._post_events(body, outcome))
    warnings = [(e[1], e[2]) for e in kube.events if e[0] == "Warning"]
    reasons = {"CrashLoopBackOff": "PoolCrashLooping", "ImagePullBackOff": "PoolImagePullFailing"}
    assert warnings == [(next(r for w, r in reasons.items() if w in m), m) for m in posted]
