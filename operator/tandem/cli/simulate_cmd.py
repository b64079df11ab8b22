"""``tandem simulate``: replay a trace on a fleet and report SLO attainment and cost."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tandem.perf.models import get_model
from tandem.sim.fleet import SLO, FleetSpec, SimConfig, SimResult, simulate
from tandem.sim.plan import parse_pool
from tandem.sim.policies import RouterPolicy, make_policy
from tandem.sim.trace import TraceRequest, load_trace, scale_rate, window


def add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Azure LLM 2023 CSV or Mooncake JSONL file")
    p.add_argument("--format", choices=["auto", "azure", "mooncake"], default="auto")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate")
    p.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    p.add_argument("--duration", type=float, default=None, help="window length in seconds")
    p.add_argument("--model", default="llama-3.1-70b")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp8"], default=None)
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--itl-slo", type=float, default=0.1, help="seconds (mean inter-token latency)")
    p.add_argument("--attainment", type=float, default=0.9, help="target fraction meeting both SLOs")
    p.add_argument("--split-threshold", type=int, default=1024, help="prompts >= this go prefill->decode")
    p.add_argument("--max-prefill-queue-tokens", type=int, default=None)


def read_trace(args: argparse.Namespace) -> list[TraceRequest]:
    trace = load_trace(args.trace, args.format)
    trace = window(trace, args.start, args.duration)
    return scale_rate(trace, args.rate_scale) if args.rate_scale != 1.0 else trace


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("simulate", help="simulate a fleet on a request trace")
    add_trace_args(p)
    p.add_argument(
        "--pool",
        action="append",
        required=True,
        help="ROLE:ACCELERATOR:COUNT[:tpN][@PRICE], repeatable (e.g. prefill:h100:2:tp2)",
    )
    p.add_argument("--autoscaler", choices=["static", "queue"], default="static")
    p.add_argument("--interval", type=float, default=30.0, help="autoscaling interval, seconds")
    p.add_argument("--startup-delay", type=float, default=120.0, help="seconds before a new replica serves")
    p.add_argument("--ttft-at-prefill", action="store_true", help="count TTFT at prefill end (DistServe)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        model = get_model(args.model, args.dtype)
        pools = tuple(parse_pool(text, model, i) for i, text in enumerate(args.pool))
        trace = read_trace(args)
    except (KeyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not trace:
        print("error: the trace window is empty", file=sys.stderr)
        return 2
    fleet = FleetSpec(model, pools)
    slo = SLO(args.ttft_slo, args.itl_slo, args.attainment)
    config = SimConfig(args.interval, args.startup_delay, ttft_on_decode=not args.ttft_at_prefill)
    policy = make_policy(args.autoscaler) if args.autoscaler != "static" else None
    router = RouterPolicy(args.split_threshold, args.max_prefill_queue_tokens)
    if args.json:
        result = simulate(trace, fleet, slo, router=router, autoscaler=policy, config=config)
        print(json.dumps(result.summary()))
        return 0
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("simulating", total=trace[-1].arrival or 1.0)
        result = simulate(
            trace,
            fleet,
            slo,
            router=router,
            autoscaler=policy,
            config=config,
            progress=lambda now, end: progress.update(task, completed=min(now, end)),
        )
    print_summary(result)
    return 0


def print_summary(result: SimResult) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary()
    table = Table(title=f"{s['fleet']}  ({s['requests']} requests)")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v: object, unit: str = "") -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}{unit}"
        return f"{v}{unit}"

    rows = [
        ("SLO attainment", fmt(s["slo_attainment"])),
        ("goodput", fmt(s["goodput_rps"], " req/s")),
        ("TTFT p50 / p90", f"{fmt(s['ttft_p50_s'])} / {fmt(s['ttft_p90_s'])} s"),
        ("mean ITL p50 / p90", f"{fmt(s['itl_p50_s'])} / {fmt(s['itl_p90_s'])} s"),
        ("split fraction", fmt(s["split_fraction"])),
        ("device-hours", fmt(s["device_hours"])),
        ("cost", f"${s['cost']:.2f}"),
        ("cost per 1k SLO-met", "-" if s["cost_per_1k_good"] is None else f"${s['cost_per_1k_good']:.3f}"),
        ("simulated / wall", f"{s['simulated_seconds']:.0f} s / {s['wall_seconds']:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
