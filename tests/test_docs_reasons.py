"""docs/troubleshooting.md is what an operator reads when a service is unhealthy: it must have a
row for every condition type, condition reason, ``lastDecision`` reason and Event reason the code
can set, and no row for a reason the code no longer sets.

The reasons are collected from the code itself: the module-level constants that hold them
(``tandem.scaling``, ``tandem.status``, ``tandem.kv_status``), and, where they are literals, from
the syntax tree of the modules that set them: the reason argument of ``_cond(...)``,
``Condition(...)``, ``Problem(...)`` and ``PairProblem(...)`` calls, the first item of a returned
``(reason, message)`` pair, and the reason of an ``("Normal" | "Warning", reason, message)`` Event
tuple. A reason passed through a variable is found where the variable got its value.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

from tandem import kv_status, scaling, status
from tandem.builders import kv

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "troubleshooting.md"
PACKAGE = ROOT / "operator" / "tandem"
SOURCES = (
    "status",
    "kv_status",
    "scaling",
    "autoscaler",
    "controller",
    "reconcile",
    "resolve",
    "planner.core",
    "builders.kv",
)
CAMEL = re.compile(r"^[A-Z][A-Za-z]+$")
# Calls whose argument is a reason: callee -> position of the reason (None: keyword only).
REASON_CALLS: dict[str, int | None] = {"Condition": None, "Problem": 0, "PairProblem": 0}
ROW = re.compile(r"^\|(.*)\|\s*$")


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _strings(expr: ast.expr, module: ModuleType) -> set[str]:
    """CamelCase strings an expression can evaluate to: literals (both sides of a conditional),
    and module-level constants named in it."""
    out: set[str] = set()
    for node in ast.walk(expr):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)
        elif isinstance(node, ast.Name):
            value = getattr(module, node.id, None)
            if isinstance(value, str):
                out.add(value)
    return {s for s in out if CAMEL.match(s)}


def _reason_arg(call: ast.Call, position: int | None) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "reason":
            return keyword.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return None


def _positions(tree: ast.Module) -> dict[str, int | None]:
    """REASON_CALLS plus the module's own ``_cond`` helper, at the position of its ``reason``."""
    positions = dict(REASON_CALLS)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_cond":
            positions["_cond"] = [a.arg for a in node.args.args].index("reason")
    return positions


def literal_reasons(name: str) -> set[str]:
    """The reasons module ``tandem.<name>`` sets as literals (or through its own constants)."""
    module = importlib.import_module(f"tandem.{name}")
    path = PACKAGE / (name.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    positions = _positions(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) in positions:
            arg = _reason_arg(node, positions[_callee(node) or ""])
            if arg is not None:
                found |= _strings(arg, module)
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            items = node.value.elts
            if len(items) == 2 and not (isinstance(items[1], ast.Constant) and items[1].value is None):
                found |= _strings(items[0], module)  # return reason, message
        elif isinstance(node, ast.Tuple) and len(node.elts) >= 3:
            kind = node.elts[0]
            if isinstance(kind, ast.Constant) and kind.value in ("Normal", "Warning"):
                found |= _strings(node.elts[1], module)  # (type, reason, message): an Event
    return found


def constant_reasons() -> set[str]:
    """The reasons kept in module-level constants rather than at the call that sets them."""
    return {
        *scaling.DATA_REASONS,
        scaling.PROMETHEUS_UNAVAILABLE,
        scaling.PROMETHEUS_NOT_CONFIGURED,
        *(reason for reason, _ in scaling._LIMITED.values()),
        *(reason for reason, _, _ in scaling._WOULD.values()),
        *status._FAILING.values(),
        kv_status.TCP_FALLBACK,
        kv_status.SIDECAR_NOT_READY,
        kv_status.INCOMPATIBLE,
        kv.INCOMPATIBLE,
    }


def code_reasons() -> set[str]:
    return constant_reasons().union(*(literal_reasons(name) for name in SOURCES))


def event_reasons() -> set[str]:
    """Reasons of the Events the operator posts with a fixed reason: each spec problem (Warning),
    the KV pairs (Warning), the holds before the planner ran (Warning), the decisions the SLO may
    suffer from (Warning), Applied and Pruned."""
    problems = literal_reasons("resolve") | literal_reasons("reconcile") | {kv.INCOMPATIBLE}
    holds = {scaling.PROMETHEUS_UNAVAILABLE, scaling.PROMETHEUS_NOT_CONFIGURED}
    return problems | holds | scaling.WARNING_REASONS | literal_reasons("controller")


def condition_types() -> set[str]:
    return {
        *status.CONDITION_ORDER,
        status.INFERENCE_POOLS_CONDITION,
        kv.CONDITION_TYPE,
        scaling.METRICS_AVAILABLE,
        scaling.SCALING_LIMITED,
    }


def table_rows(text: str) -> dict[tuple[str, ...], set[str]]:
    """Header cells of each Markdown table -> the backticked names opening its rows."""
    tables: dict[tuple[str, ...], set[str]] = {}
    header: tuple[str, ...] | None = None
    for line in text.splitlines():
        match = ROW.match(line.strip())
        if match is None:
            header = None
            continue
        cells = tuple(c.strip() for c in match[1].split("|"))
        if header is None:
            header = cells
            tables.setdefault(header, set())
        elif re.fullmatch(r"`[^`]+`", cells[0]):
            tables[header].add(cells[0].strip("`"))
    return tables


def rows_under(text: str, first: str, second: str | None = None) -> set[str]:
    """Names opening the rows of the tables whose header starts with ``first`` (and ``second``)."""
    return set().union(
        *(
            rows
            for header, rows in table_rows(text).items()
            if header[0] == first and (second is None or header[1:2] == (second,))
        )
    )


def test_the_extractor_finds_reasons_of_every_kind() -> None:
    reasons = code_reasons()
    samples = {
        "AcceleratorPoolNotFound",  # resolve.Problem
        "InvalidSpec",  # reconcile.Problem
        "ChildRejected",
        "AllReplicasReady",  # status._cond
        "APINotServed",
        "NoMatchingNodes",  # the AcceleratorPool's
        "NotDisaggregated",  # kv_status._cond, positional reason
        "MetricsRead",  # scaling._cond
        "Steady",  # planner.core: return reason, message
        "BudgetLimited",  # ... inside a conditional expression
        "ScrapeGap",
        "RecommendScaleUp",  # scaling._WOULD
        "MinReplicas",  # scaling._LIMITED
        "PoolImagePullFailing",  # status._FAILING
        "Applied",  # controller: an Event tuple
    }
    assert samples <= reasons
    assert len(reasons) >= 45
    assert not {"Normal", "Warning", "Deployment", "InferencePool"} & reasons


@pytest.mark.parametrize("reason", sorted(code_reasons()))
def test_reason_has_a_row(reason: str) -> None:
    assert reason in rows_under(DOC.read_text(), "Reason"), (
        f"reason {reason!r} is set by the code but has no row in docs/troubleshooting.md"
    )


def test_every_documented_reason_is_set_by_the_code() -> None:
    stale = rows_under(DOC.read_text(), "Reason") - code_reasons()
    assert not stale, f"docs/troubleshooting.md documents reasons the code never sets: {sorted(stale)}"


@pytest.mark.parametrize("reason", sorted(event_reasons()))
def test_event_reason_has_a_row_in_the_events_table(reason: str) -> None:
    assert reason in rows_under(DOC.read_text(), "Reason", "Type")


@pytest.mark.parametrize("condition", sorted(condition_types()))
def test_condition_type_has_a_row(condition: str) -> None:
    assert condition in rows_under(DOC.read_text(), "Condition")


def test_a_deleted_row_is_noticed() -> None:
    text = DOC.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `ScrapeGap`"))
    assert "ScrapeGap" in rows_under(text, "Reason")
    assert "ScrapeGap" not in rows_under(without, "Reason")


def test_table_rows() -> None:
    text = "| Reason | Type |\n| --- | --- |\n| `A` | x |\n| B | y |\n\n| Condition |\n| --- |\n| `C` |\n"
    assert table_rows(text) == {("Reason", "Type"): {"A"}, ("Condition",): {"C"}}
    assert rows_under(text, "Reason", "Type") == {"A"}
    assert rows_under(text, "Reason", "Status") == set()
