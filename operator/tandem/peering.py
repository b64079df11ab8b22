"""Which replica acts: kopf's peering rule, applied to Tandem's own background work.

kopf pauses a replica's watch streams when a live peer of higher (or equal) priority shares its
peering object, but the controller's resync loop, the AcceleratorPools' status writes and the
planner loop are Tandem's own tasks, which kopf does not pause. :class:`PeeringGate` reads the
same peering object kopf keeps its heartbeats in (a ClusterKopfPeering, or a KopfPeering per
watched namespace) and applies the same rule (kopf/_core/engines/peering.py,
``process_peering_event``), so those tasks act only where kopf's handlers would.

The rule (:func:`peering_active`): a replica acts when no *other* live peer has a priority
greater than or equal to its own; a peer is live until ``lastseen + lifetime``. Until the object
has been read once, and while it is missing, the replica stands by (as kopf does when peering is
mandatory).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tandem.kube import Kube, KubeError

log = logging.getLogger("tandem.peering")


@dataclass(frozen=True)
class PeeringSettings:
    name: str
    identity: str
    priority: int
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide (ClusterKopfPeering)
    poll_seconds: float = 2.0


def _parse_time(text: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def peering_active(
    status: Mapping[str, Any] | None, identity: str, priority: int, now: datetime.datetime
) -> bool:
    """True when no other live peer in ``status`` (kopf's ``{id: {priority, lifetime, lastseen}}``)
    has a priority >= ``priority``. An unreadable entry counts as a live peer (stand by, not act)."""
    for peer, info in (status or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            their_priority = int(info.get("priority", 0))
            lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
        except (TypeError, ValueError):
            return False
        seen = _parse_time(str(info.get("lastseen", "")))
        if seen is not None and seen + lifetime <= now:
            continue  # dead: kopf cleans it up
        if their_priority >= priority:
            return False
    return True


class PeeringGate:
    """Polls the peering object(s); ``active`` says whether this replica may act.

    ``on_change(active)`` is called on every flip (not on the first reading if it is standby).
    """

    def __init__(self, kube: Kube, settings: PeeringSettings, on_change: Callable[[bool], None]) -> None:
        self.kube = kube
        self.settings = settings
        self.on_change = on_change
        self.active = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # never stops the loop; the replica keeps its last verdict
                log.exception("Could not read the peering object %s", self.settings.name)
            await asyncio.sleep(self.settings.poll_seconds)

    async def check(self) -> bool:
        statuses = await asyncio.to_thread(self._read)
        now = datetime.datetime.now(datetime.UTC)
        verdict = decide_active(statuses, self.settings.identity, self.settings.priority, now)
        if verdict != self.active:
            self.active = verdict
            log.info(
                "%s: this replica (priority %d) %s",
                self.settings.name,
                self.settings.priority,
                "acts" if verdict else "stands by for a peer of higher or equal priority",
            )
            self.on_change(verdict)
        return verdict

    def _read(self) -> list[Mapping[str, Any] | None]:
        """The status of each peering object (None where it is missing or unreadable)."""
        name = quote(self.settings.name, safe="")
        query = [("fieldSelector", f"metadata.name={name}")]
        paths = (
            [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings" for ns in self.settings.namespaces]
            if self.settings.namespaces
            else ["/apis/kopf.dev/v1/clusterkopfpeerings"]
        )
        out: list[Mapping[str, Any] | None] = []
        for path in paths:
            try:
                items = self.kube.request("GET", path, query=query).get("items") or []
            except KubeError as exc:
                log.warning("Could not read the peering object at %s: %s", path, exc)
                out.append(None)
                continue
            out.append((items[0].get("status") or {}) if items else None)
        return out


def decide_active(
    statuses: Sequence[Mapping[str, Any] | None], identity: str, priority: int, now: datetime.datetime
) -> bool:
    """Active only where every peering object exists and says so (one per watched namespace)."""
    return bool(statuses) and all(
        s is not None and peering_active(s, identity, priority, now) for s in statuses
    )
