"""The planner's TTFT queueing model against the simulator, on a steady load.

The planner sizes a prefill pool per replica: the median prompt's first token plus an M/M/1
waiting-time quantile must fit ``ttft_headroom`` of the TTFT target (`capacity.max_load`).
This replays a steady log-normal load (`traces.generate`) on static fleets of the given sizes
of one prefill pool and prints, per fleet size, the share of first tokens within the target
in the simulator beside two predictions of it by `capacity.queue_attainment`: one queue per
replica (M/M/1) and one queue for the pool (M/M/c, the router sending each prompt to the
least-loaded replica), each prompt length meeting the target unless it waits longer than its
own slack. It also prints how many replicas the planner's sizing asks for, per replica and
pooled (`Tuning.pooled_servers_max`).

``make bench-queue`` runs a long-context and a chat shape (bench/out/queue.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.bench.run import BenchConfig
from tandem.bench.traces import generate
from tandem.perf import get_accelerator
from tandem.planner import capacity, lengths
from tandem.planner.policy import planner_spec_for_fleet
from tandem.sim.fleet import FleetSpec, pool, simulate
from tandem.sim.policies import RouterPolicy
from tandem.sim.trace import TraceRequest


@dataclass(frozen=True)
class Row:
    replicas: int
    utilisation: float  # offered prefill work per replica (the model's mean work)
    sim: float  # share of first tokens within the target in the simulator
    sim_reachable: float | None  # the same among prompts an idle replica can make in time
    per_replica: float  # queue_attainment with one queue per replica (M/M/1)
    pooled: float  # queue_attainment with one queue for the pool (M/M/c)


@dataclass(frozen=True)
class Report:
    accelerator: str
    isl: float
    osl: float
    rate: float
    requests: int
    longest_reachable: int  # tokens (`capacity.longest_prompt_within`)
    reachable_share: float
    sized_per_replica: int | None  # replicas the planner's default sizing asks for
    sized_pooled: int | None  # ... with pooled queueing (M/M/c)
    rows: tuple[Row, ...]


def _histogram(trace: Sequence[TraceRequest]) -> list[tuple[float, float]]:
    """Cumulative prompt counts per vLLM bucket bound, as the planner reads them."""
    return [(le, float(sum(1 for r in trace if r.prompt_tokens <= le))) for le in lengths.BUCKETS]


def compare(
    accelerator: str,
    isl: float,
    osl: float,
    rate: float,
    replicas: Sequence[int],
    *,
    cfg: BenchConfig | None = None,
    duration_s: float = 1800.0,
    seed: int = 7,
    decode: str = "gaudi3",
    decode_replicas: int = 2,
    warmup_s: float = 120.0,
) -> Report:
    """Replay ``rate`` req/s of log-normal prompts (mean ``isl``) on each fleet size of
    ``replicas`` prefill replicas of ``accelerator`` (split serving, ``decode_replicas`` decode
    replicas of ``decode``); score the requests arriving after ``warmup_s``."""
    if rate <= 0 or isl < 1 or osl < 1 or duration_s <= warmup_s or not replicas or min(replicas) < 1:
        raise ValueError("rate, isl, osl and replicas must be positive, and the run longer than its warm-up")
    cfg = cfg or BenchConfig()
    trace = generate(lambda _t: (rate, isl, osl), duration_s, rate, seed)
    acc = get_accelerator(accelerator)

    def fleet(n: int) -> FleetSpec:
        return FleetSpec(
            cfg.model,
            (
                pool("prefill", "prefill", acc, 1, n),
                pool("decode", "decode", get_accelerator(decode), 1, decode_replicas),
            ),
        )

    spec = planner_spec_for_fleet(fleet(1), cfg.slo, split_threshold=1, tuning=cfg.tuning)
    target = spec.by_role("prefill")[0]
    ttft, tune = cfg.slo.ttft_s, cfg.tuning
    mean = sum(r.prompt_tokens for r in trace) / len(trace)
    dist = lengths.from_buckets(_histogram(trace), mean) or lengths.lognormal(mean)
    points = dist.points()
    prof = capacity.profile(acc, cfg.model, 1)
    budget = target.max_batch_tokens or capacity.DEFAULT_BUDGET["prefill"]
    work = capacity.work_seconds(prof, round(mean), budget, points)[0]
    firsts = [
        (
            capacity.split_first_token_s(
                prof, cfg.model, target, n, capacity.prompt_seconds(prof, n, budget)[1]
            ),
            w,
        )
        for n, w in ((max(1, round(length)), w) for length, w in points)
    ]
    longest = capacity.longest_prompt_within(target, cfg.model, ttft)
    q = 1.0 - cfg.slo.attainment_target

    def cap(servers: int) -> float:
        c = capacity.prefill_capacity(
            target, cfg.model, mean, ttft, q, tune, 1.0, dist.median(), points, servers
        )
        return c.rps

    one = cap(1)
    sized = math.ceil(rate / one - 1e-9) if one > 0 else None
    pooled = next((n for n in range(1, 257) if n * cap(n) >= rate - 1e-9), None)
    rows: list[Row] = []
    for n in replicas:
        result = simulate(trace, fleet(n), cfg.slo, router=RouterPolicy(1), config=cfg.sim)
        scored = [r for r in result.requests if r.arrival >= warmup_s]
        met = [r.ttft is not None and r.ttft <= ttft for r in scored]
        inside = [m for r, m in zip(scored, met, strict=True) if r.prompt_tokens <= longest]
        rho = rate * work / n
        rows.append(
            Row(
                n,
                rho,
                sum(met) / max(1, len(met)),
                sum(inside) / len(inside) if inside else None,
                capacity.queue_attainment(firsts, work, ttft, rho, 1),
                capacity.queue_attainment(firsts, work, ttft, rho, n),
            )
        )
    reachable = sum(1 for r in trace if r.prompt_tokens <= longest) / len(trace)
    return Report(accelerator, isl, osl, rate, len(trace), longest, reachable, sized, pooled, tuple(rows))


def markdown(report: Report) -> str:
    r = report
    lines = [
        f"### {r.accelerator} prefill, {r.rate:g} req/s, mean prompt {r.isl:g} / output {r.osl:g} tokens",
        "",
        f"{r.requests} requests; an idle replica makes the TTFT target for prompts up to"
        f" {r.longest_reachable} tokens ({r.reachable_share:.1%} of them)."
        f" The planner's sizing asks for {r.sized_per_replica} replicas (one queue per replica,"
        f" the default), {r.sized_pooled} with one queue for the pool.",
        "",
        "| replicas | utilisation | simulator | simulator, reachable | M/M/1 per replica | M/M/c pooled |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r.rows:
        reach = "-" if row.sim_reachable is None else f"{row.sim_reachable:.3f}"
        cells = [str(row.replicas), f"{row.utilisation:.2f}", f"{row.sim:.3f}", reach]
        cells += [f"{row.per_replica:.3f}", f"{row.pooled:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.queueing", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        action="append",
        required=True,
        metavar="ACC:ISL:OSL:RATE:N,N,...",
        help="accelerator, mean prompt and output tokens, requests/s, prefill fleet sizes",
    )
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load (default 1800)")
    ap.add_argument("--out", type=Path, help="write the reports here as JSON")
    args = ap.parse_args(argv)
    reports: list[Report] = []
    for shape in args.shape:
        try:
            acc, isl, osl, rate, sizes = shape.split(":")
            report = compare(
                acc,
                float(isl),
                float(osl),
                float(rate),
                [int(n) for n in sizes.split(",")],
                duration_s=args.duration,
            )
        except (ValueError, KeyError) as err:
            print(f"error: --shape {shape!r}: {err}", file=sys.stderr)
            return 2
        print(markdown(report))
        reports.append(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Report", "Row", "compare", "markdown"]
