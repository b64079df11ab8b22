"""What an InferenceService's status says, arranged for a person (pure; ``tandem explain``).

``kubectl get tisvc NAME -o yaml`` carries everything, but the planner's decision is a flat map
of some sixty signals. This groups them: per pool (replicas ready/desired, what the planner
recommends, its capacity, bottleneck and online correction), per demand class (requests/s now
and planned, mean prompt and output), the error budget and routing, then the conditions and,
like ``kubectl describe``, the latest Events about the object.
Signals it does not know are listed as they are, so nothing the planner said is hidden.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tandem import names

POOL_SIGNALS = ("capacityRps", "bottleneck", "correction", "recommended")
CLASS_SIGNALS = ("rps", "plannedRps", "isl", "osl")
BUDGET_SIGNALS = (
    ("ttftWithinTarget", "first tokens within the TTFT target (30 min)"),
    ("ttftOutOfReach", "prompts no pool prefills in time"),
    ("errorBudget", "error budget"),
    ("errorBudgetSource", "read from"),
    ("demandSource", "demand read from"),
    ("burstFloorRps", "burst floor (req/s)"),
    ("scaleDownWindowSeconds", "scale-down window (s)"),
    ("splitThreshold", "router's split threshold (tokens)"),
    ("plannedSplitThreshold", "planned split threshold (tokens)"),
    ("plannedCostPerHour", "planned fleet ($/h)"),
)
CLASSES = ("split", "mixed")


def _signals(status: Mapping[str, Any]) -> dict[str, str]:
    decision = status.get("lastDecision") or {}
    return {str(k): str(v) for k, v in (decision.get("signals") or {}).items()}


def pools_table(status: Mapping[str, Any], signals: Mapping[str, str]) -> Table:
    table = Table(title="Pools", title_justify="left")
    for column in ("pool", "role", "accelerator pool", "ready/desired", "planner wants", *POOL_SIGNALS[:3]):
        table.add_column(
            column, justify="left" if column in ("pool", "role", "accelerator pool") else "right"
        )
    for pool in status.get("pools") or []:
        name = str(pool.get("name", ""))
        wanted = pool.get("recommendedReplicas")
        planned = signals.get(f"{name}.recommended")
        recommended = str(wanted) if wanted is not None else (planned if planned not in (None, "-") else "")
        table.add_row(
            name,
            str(pool.get("role", "")),
            str(pool.get("acceleratorPool", "")),
            f"{pool.get('readyReplicas', 0)}/{pool.get('desiredReplicas', 0)}",
            recommended,
            *(signals.get(f"{name}.{s}", "") for s in POOL_SIGNALS[:3]),
        )
    return table


def demand_table(signals: Mapping[str, str]) -> Table | None:
    rows = [(c, [signals.get(f"{c}.{s}", "") for s in CLASS_SIGNALS]) for c in CLASSES]
    rows = [(c, values) for c, values in rows if any(values)]
    if not rows:
        return None
    table = Table(title="Demand per path", title_justify="left")
    for column in ("path", "req/s now", "req/s planned", "mean prompt", "mean output"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, values in rows:
        table.add_row(name, *values)
    return table


def budget_table(signals: Mapping[str, str]) -> Table | None:
    rows = [(label, signals[key]) for key, label in BUDGET_SIGNALS if key in signals]
    if not rows:
        return None
    table = Table(title="Error budget and routing", title_justify="left", show_header=False)
    table.add_column("signal")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def conditions_table(status: Mapping[str, Any]) -> Table:
    table = Table(title="Conditions", title_justify="left")
    for column in ("type", "status", "reason", "message"):
        table.add_column(column)
    for c in status.get("conditions") or []:
        table.add_row(str(c.get("type", "")), str(c.get("status", "")), str(c.get("reason", "")),
                      str(c.get("message", "")))  # fmt: skip
    return table


def _known(pools: Sequence[str]) -> set[str]:
    known = {key for key, _ in BUDGET_SIGNALS}
    known |= {f"{p}.{s}" for p in pools for s in POOL_SIGNALS}
    known |= {f"{c}.{s}" for c in CLASSES for s in CLASS_SIGNALS}
    return known


@dataclass(frozen=True)
class Events:
    """The Events listed about an object, for ``explain``'s last section.

    ``items``: as the API returns them, in either shape: ``events.k8s.io/v1`` (``regarding``,
    ``note``, ``series``, ``deprecated*``; what the operator posts) or core ``v1``
    (``involvedObject``, ``message``, ``count``, ``lastTimestamp``; what kopf posts). Both APIs
    serve the same Events, so either list will do. ``now``: epoch seconds, the ages are taken
    from it. ``limit``: how many of the newest to show. ``error``: why they could not be listed
    (e.g. ``403 Forbidden``); the section then says so in one line instead.
    """

    now: float
    items: Sequence[Mapping[str, Any]] = ()
    limit: int = 10
    error: str | None = None


@dataclass(frozen=True)
class EventRow:
    type: str
    reason: str
    message: str
    count: int
    first: float | None  # epoch seconds
    last: float | None


def _time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time (``Time`` or ``MicroTime``); None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _first_of(*values: Any) -> Any:
    return next((v for v in values if v), None)


def regarding(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object an Event is about, in either shape."""
    ref = event.get("regarding") or event.get("involvedObject") or {}
    return ref if isinstance(ref, Mapping) else {}


def is_about(event: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """Whether ``event`` is about ``obj``: kind, name and namespace, and its uid when ``obj`` has
    one (an earlier object of the same name, or another group's ``InferenceService``, is not it)."""
    meta = obj.get("metadata") or {}
    ref = regarding(event)
    namespace = ref.get("namespace") or (event.get("metadata") or {}).get("namespace")
    if (ref.get("kind"), ref.get("name")) != (obj.get("kind", names.KIND_SERVICE), meta.get("name")):
        return False
    if meta.get("namespace") and namespace != meta.get("namespace"):
        return False
    return not meta.get("uid") or ref.get("uid") == meta.get("uid")


def event_row(event: Mapping[str, Any]) -> EventRow:
    """One Event in either shape, as ``kubectl describe`` reads it: first seen, last seen, count."""
    series = event.get("series") or {}
    created = (event.get("metadata") or {}).get("creationTimestamp")
    e = event.get
    first = _time(_first_of(e("firstTimestamp"), e("deprecatedFirstTimestamp"), e("eventTime"), created))
    seen = (series.get("lastObservedTime"), e("lastTimestamp"), e("deprecatedLastTimestamp"), e("eventTime"))
    last = _time(_first_of(*seen))
    count = _first_of(series.get("count"), e("count"), e("deprecatedCount"), 1)
    return EventRow(
        type=str(event.get("type") or ""),
        reason=str(event.get("reason") or ""),
        message=str(_first_of(event.get("note"), event.get("message"), "")).strip(),
        count=int(count),
        first=first,
        last=first if last is None else last,
    )


# (below this many seconds: the unit in seconds, its name, the sub-unit in seconds or 0 for none, its
# name), after Kubernetes' duration.HumanDuration so that ages read as in ``kubectl describe``:
# 90s, 5m30s, 42m, 3h15m, 20h, 3d4h, 40d, 2y10d
_AGE_STEPS = (
    (10 * 60, 60, "m", 1, "s"),
    (3 * 3600, 60, "m", 0, ""),
    (8 * 3600, 3600, "h", 60, "m"),
    (48 * 3600, 3600, "h", 0, ""),
    (8 * 86400, 86400, "d", 3600, "h"),
    (2 * 365 * 86400, 86400, "d", 0, ""),
    (8 * 365 * 86400, 365 * 86400, "y", 86400, "d"),
)


def age(seconds: float) -> str:
    """A duration as ``kubectl`` prints ages (Kubernetes' ``duration.HumanDuration``)."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"  # a clock ahead of ours by more than a second
    if whole < 120:
        return f"{max(whole, 0)}s"
    for limit, unit_s, unit, sub_s, sub in _AGE_STEPS:
        if whole < limit:
            rest = (whole % unit_s) // sub_s if sub_s else 0
            return f"{whole // unit_s}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{whole // (365 * 86400)}y"


def _age_of(row: EventRow, now: float) -> str:
    if row.last is None:
        return "<unknown>"
    if row.count > 1 and row.first is not None:
        return f"{age(now - row.last)} (x{row.count} over {age(now - row.first)})"
    return age(now - row.last)


def latest_events(obj: Mapping[str, Any], items: Sequence[Mapping[str, Any]], limit: int) -> list[EventRow]:
    """The ``limit`` most recently seen Events about ``obj``, newest last (as ``kubectl describe``)."""
    rows = [event_row(e) for e in items if is_about(e, obj)]
    rows.sort(key=lambda r: (r.last is not None, r.last or 0.0, r.first or 0.0))
    return rows[-limit:] if limit > 0 else []


def events_part(obj: Mapping[str, Any], events: Events) -> list[RenderableType]:
    """The Events section: a table of the newest, or one line saying there are none or why not."""
    if events.error is not None:
        return [Text(f"Events: not listed ({events.error}).", no_wrap=True, overflow="ellipsis")]
    about = sum(1 for e in events.items if is_about(e, obj))
    rows = latest_events(obj, events.items, events.limit)
    if not rows:
        return [Text("Events: <none>")]
    table = Table(title="Events", title_justify="left")
    for column in ("type", "reason", "age"):
        table.add_column(column, no_wrap=True)
    table.add_column("message", overflow="fold")
    for row in rows:
        table.add_row(row.type, row.reason, _age_of(row, events.now), row.message)
    parts: list[RenderableType] = [table]
    if about > len(rows):
        older = about - len(rows)
        plural = "s" if older > 1 else ""
        parts.append(Text(f"{older} older Event{plural} not shown (--events N shows more)."))
    return parts


def renderables(obj: Mapping[str, Any], events: Events | None = None) -> list[RenderableType]:
    """The parts of ``explain`` for one InferenceService object (as the API returns it), and the
    Events about it last when ``events`` is given (None: no Events section)."""
    return _status_parts(obj) + (events_part(obj, events) if events is not None else [])


def _status_parts(obj: Mapping[str, Any]) -> list[RenderableType]:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    signals = _signals(status)
    mode = str((spec.get("autoscaling") or {}).get("mode", "off"))
    head = Text(f"{meta.get('namespace', '')}/{meta.get('name', '')}", style="bold")
    head.append(f"  autoscaling: {mode}")
    if status.get("ratio"):
        head.append(f"  P:D {status['ratio']}")
    if status.get("targetRatio"):
        head.append(f" (target {status['targetRatio']})")
    if not status:
        return [head, Text("No status yet: is the operator running and watching this namespace?")]
    parts: list[RenderableType] = [head, pools_table(status, signals)]
    decision = status.get("lastDecision")
    if decision:
        line = Text("Last decision: ", style="bold")
        line.append(
            f"{decision.get('reason', '')} at {decision.get('time', '')}. {decision.get('message', '')}"
        )
        parts.append(line)
    elif mode in ("planner", "recommend"):
        parts.append(Text("No planner decision yet."))
    for table in (demand_table(signals), budget_table(signals)):
        if table is not None:
            parts.append(table)
    pools = [str(p.get("name", "")) for p in status.get("pools") or []]
    rest = {k: v for k, v in signals.items() if k not in _known(pools)}
    if rest:
        parts.append(Text("Other signals: " + ", ".join(f"{k}={v}" for k, v in sorted(rest.items()))))
    parts.append(conditions_table(status))
    return parts


def render(obj: Mapping[str, Any], width: int = 120, events: Events | None = None) -> str:
    """``explain`` as plain text (no colour codes)."""
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(Group(*renderables(obj, events)))
    return capture.get()


__all__ = ["Events", "render", "renderables"]
