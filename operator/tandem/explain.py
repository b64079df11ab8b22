"""What an InferenceService's status says, arranged for a person (pure; ``tandem explain``).

``kubectl get tisvc NAME -o yaml`` carries everything, but the planner's decision is a flat map
of some sixty signals. This groups them: per pool (replicas ready/desired, what the planner
recommends, its capacity, bottleneck and online correction), per demand class (requests/s now
and planned, mean prompt and output), the error budget and routing, then the conditions.
Signals it does not know are listed as they are, so nothing the planner said is hidden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

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


def renderables(obj: Mapping[str, Any]) -> list[RenderableType]:
    """The parts of ``explain`` for one InferenceService object (as the API returns it)."""
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


def render(obj: Mapping[str, Any], width: int = 120) -> str:
    """``explain`` as plain text (no colour codes)."""
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(Group(*renderables(obj)))
    return capture.get()


__all__ = ["render", "renderables"]
