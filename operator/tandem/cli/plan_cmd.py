"""``tandem plan``: the cheapest heterogeneous fleet that meets an SLO on a trace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tandem.cli.simulate_cmd import add_trace_args, read_trace
from tandem.perf.models import get_model
from tandem.sim.fleet import SLO, SimConfig
from tandem.sim.plan import Candidate, Offer, Planner, PlanResult, parse_offer
from tandem.sim.policies import RouterPolicy


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="find the cheapest prefill/decode/mixed fleet that meets an SLO")
    add_trace_args(p)
    p.add_argument(
        "--pool",
        action="append",
        default=None,
        help="accelerators you can use: NAME[=MAX_DEVICES][@PRICE], repeatable (default: h100, mi300x)",
    )
    p.add_argument("--chart", default="tandem-plan.png", help="PNG chart of cost vs SLO attainment")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _describe(c: Candidate | None) -> dict[str, Any] | None:
    if c is None:
        return None
    s = c.result.summary()
    return {
        "label": c.label,
        "fleet": c.fleet.describe(),
        "hourly_cost": c.hourly_cost,
        "slo_attainment": c.result.slo_attainment,
        "goodput_rps": c.result.goodput,
        "cost_per_1k_good": s["cost_per_1k_good"],
    }


def run(args: argparse.Namespace) -> int:
    try:
        model = get_model(args.model, args.dtype)
        offers: list[Offer] = [parse_offer(t) for t in (args.pool or ["h100", "mi300x"])]
        trace = read_trace(args)
    except (KeyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not trace:
        print("error: the trace window is empty", file=sys.stderr)
        return 2
    slo = SLO(args.ttft_slo, args.itl_slo, args.attainment)
    router = RouterPolicy(args.split_threshold, args.max_prefill_queue_tokens)
    started = time.perf_counter()
    if args.json:
        plan = Planner(trace, model, slo, offers, router=router, config=SimConfig()).run()
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
        ) as bar:
            task = bar.add_task("planning", total=None)

            def tick(c: Candidate) -> None:
                bar.update(task, description=f"simulated {c.fleet.describe()}: {c.result.slo_attainment:.3f}")

            plan = Planner(
                trace, model, slo, offers, router=router, config=SimConfig(), on_simulated=tick
            ).run()
    wall = time.perf_counter() - started
    chart = write_chart(plan, args.chart, slo) if plan.candidates else None
    summary = {
        "recommended": _describe(plan.recommended),
        "best_homogeneous": _describe(plan.best_homogeneous),
        "best_colocated": _describe(plan.best_colocated),
        "shapes": [_describe(c) for c in plan.shapes],
        "simulations": len(plan.candidates),
        "chart": chart,
        "wall_seconds": wall,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print_plan(plan, summary, slo)
    return 0 if plan.recommended is not None else 1


def print_plan(plan: PlanResult, summary: dict[str, Any], slo: SLO) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(
        title=(
            f"Cheapest fleet per shape (TTFT <= {slo.ttft_s}s, ITL <= {slo.itl_s}s,"
            f" >= {slo.attainment_target:.0%})"
        )
    )
    for col in ("shape", "fleet", "$/h", "attainment", "goodput req/s", "$ per 1k good"):
        table.add_column(col, justify="right" if col not in ("shape", "fleet") else "left")
    best = plan.recommended
    for c in sorted(plan.shapes, key=lambda c: c.hourly_cost):
        s = c.result.summary()
        mark = " *" if c is best else ""
        table.add_row(
            c.label + mark,
            c.fleet.describe(),
            f"{c.hourly_cost:.2f}",
            f"{c.result.slo_attainment:.3f}",
            f"{c.result.goodput:.2f}",
            "-" if s["cost_per_1k_good"] is None else f"{s['cost_per_1k_good']:.3f}",
        )
    console.print(table)
    for key, title in (
        ("recommended", "Recommended"),
        ("best_homogeneous", "Best homogeneous"),
        ("best_colocated", "Best co-located"),
    ):
        d = summary[key]
        if d is None:
            console.print(f"{title}: none meets the SLO")
        else:
            console.print(
                f"{title}: {d['fleet']} at ${d['hourly_cost']:.2f}/h (attainment {d['slo_attainment']:.3f})"
            )
    rec, homo, co = plan.recommended, plan.best_homogeneous, plan.best_colocated
    if rec is not None and co is not None and co.hourly_cost > 0:
        console.print(f"Saving vs co-located: {1 - rec.hourly_cost / co.hourly_cost:.0%}")
    if rec is not None and homo is not None and homo.hourly_cost > 0:
        console.print(f"Saving vs homogeneous: {1 - rec.hourly_cost / homo.hourly_cost:.0%}")
    console.print(
        f"{summary['simulations']} simulations in {summary['wall_seconds']:.1f} s; chart: {summary['chart']}"
    )


def write_chart(plan: PlanResult, path: str, slo: SLO) -> str:
    """Scatter of hourly cost vs SLO attainment for every simulated candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = sorted({c.label for c in plan.candidates})
    for label in labels:
        pts = [c for c in plan.candidates if c.label == label]
        ax.scatter(
            [c.hourly_cost for c in pts], [c.result.slo_attainment for c in pts], label=label, alpha=0.7
        )
    for name, c in (
        ("recommended", plan.recommended),
        ("homogeneous", plan.best_homogeneous),
        ("co-located", plan.best_colocated),
    ):
        if c is not None:
            ax.annotate(
                name,
                (c.hourly_cost, c.result.slo_attainment),
                textcoords="offset points",
                xytext=(5, -12),
                fontsize=8,
            )
    ax.axhline(slo.attainment_target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("fleet cost (USD per hour)")
    ax.set_ylabel("SLO attainment (TTFT and ITL met)")
    ax.set_title("tandem plan: candidates")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
