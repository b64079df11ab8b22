"""Records an InferenceService's planner-visible state once a second (for the closed-loop test and
the demo): desired replicas per pool, ratio, target ratio, ``lastDecision`` and conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GROUP, VERSION, PLURAL = "inference.tandem.dev", "v1alpha1", "inferenceservices"


@dataclass(frozen=True)
class Snapshot:
    at: float  # monotonic
    replicas: dict[str, int]  # pool -> desired replicas (status.pools)
    ready: dict[str, int]
    ratio: str | None
    target_ratio: str | None
    decision: dict[str, Any] | None  # status.lastDecision
    conditions: dict[str, dict[str, Any]]

    def condition(self, type_: str) -> tuple[str | None, str | None]:
        c = self.conditions.get(type_) or {}
        return c.get("status"), c.get("reason")


def snapshot_of(obj: dict[str, Any]) -> Snapshot:
    st = obj.get("status") or {}
    pools = st.get("pools") or []
    return Snapshot(
        at=time.monotonic(),
        replicas={p["name"]: int(p.get("desiredReplicas", 0)) for p in pools},
        ready={p["name"]: int(p.get("readyReplicas", 0)) for p in pools},
        ratio=st.get("ratio"),
        target_ratio=st.get("targetRatio"),
        decision=st.get("lastDecision"),
        conditions={c["type"]: c for c in st.get("conditions") or []},
    )


@dataclass
class PlannerWatch:
    api: Any
    namespace: str
    name: str
    period: float = 1.0
    on_change: Callable[[Snapshot, Snapshot | None], None] | None = None
    history: list[Snapshot] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PlannerWatch:
        from kubernetes import client

        custom = client.CustomObjectsApi(self.api)

        def run() -> None:
            while not self._stop.is_set():
                try:
                    obj = custom.get_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, self.name
                    )
                    snap = snapshot_of(obj)
                    last = self.history[-1] if self.history else None
                    self.history.append(snap)
                    if self.on_change and (last is None or _differs(last, snap)):
                        self.on_change(snap, last)
                except Exception:  # the next period retries
                    pass
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def latest(self) -> Snapshot | None:
        return self.history[-1] if self.history else None

    def since(self, start: float) -> list[Snapshot]:
        return [s for s in self.history if s.at >= start]

    def decision_reasons(self, start: float = 0.0) -> list[str]:
        """The distinct lastDecision reasons seen since ``start``, in order."""
        out: list[str] = []
        for s in self.since(start):
            reason = (s.decision or {}).get("reason")
            if reason and (not out or out[-1] != reason):
                out.append(reason)
        return out


def _differs(a: Snapshot, b: Snapshot) -> bool:
    return (
        a.replicas,
        a.ratio,
        a.target_ratio,
        (a.decision or {}).get("time"),
        a.condition("MetricsAvailable"),
    ) != (
        b.replicas,
        b.ratio,
        b.target_ratio,
        (b.decision or {}).get("time"),
        b.condition("MetricsAvailable"),
    )
