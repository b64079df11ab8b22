"""``python -m tandem.bench``: run the planner benchmark and write results.json, a markdown
table and PNG timelines (replicas per pool against load) into ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tandem.bench.run import POLICIES, BenchConfig, PolicyRun, run_trace
from tandem.bench.traces import SYNTHETIC, resample_blocks
from tandem.planner.types import Tuning
from tandem.sim.trace import TraceRequest, load_trace

# Goals of issue 6 (cost per 1,000 SLO-met requests relative to each baseline).
GOALS = {"colocated-hpa": 0.5, "dynamo-sla": 0.77, "oracle": 1.15}


def trace_name(path: str) -> str:
    return Path(path).name.rsplit(".", 1)[0]


def _c1k(metrics: Mapping[str, Any], warm: bool) -> Any:
    source = (metrics.get("after_warmup") or {}) if warm else metrics
    return source.get("cost_per_1k_good")


def ratios(policies: Mapping[str, Mapping[str, Any]], warm: bool = False) -> dict[str, float | None]:
    """Tandem's cost per 1,000 SLO-met requests over each baseline's (``warm``: after the warm-up)."""
    mine = _c1k(policies.get("tandem", {}), warm)
    out: dict[str, float | None] = {}
    for base in GOALS:
        theirs = _c1k(policies.get(base, {}), warm)
        out[base] = round(mine / theirs, 3) if mine is not None and theirs else None
    return out


def verdict(policies: Mapping[str, Mapping[str, Any]], target: float) -> dict[str, bool | None]:
    r = ratios(policies)
    att = policies.get("tandem", {}).get("slo_attainment")
    out: dict[str, bool | None] = {"attainment": None if att is None else bool(att >= target)}
    for base, limit in GOALS.items():
        ratio = r[base]
        out[f"vs_{base}"] = None if ratio is None else ratio <= limit
    return out


def markdown(results: Mapping[str, Any], target: float) -> str:
    lines = [
        "# Planner benchmark",
        "",
        f"SLO: TTFT {results['slo']['ttft_s']} s, mean ITL {results['slo']['itl_s']} s, "
        f"attainment target {target}. Costs in USD (catalog prices).",
        "",
    ]
    if results.get("window_s"):
        lines += [
            f"Windows at target: of the {results['window_s']:.0f}-s windows of the trace (by "
            "arrival), those whose attainment met the target, and the lowest window's. The goal "
            "counts the whole trace, where one window's surplus pays for another's misses; the "
            "oracle chooses its fleet knowing all of them.",
            "",
        ]
    for name, entry in results["traces"].items():
        lines += [f"## {name} ({entry['requests']} requests, {entry['duration_s']:.0f} s)", ""]
        lines += [
            "| policy | SLO attainment | $/1k good | $/hour | scale actions | "
            "after warm-up: attainment | $/1k good | windows at target (lowest) | fleet (start) |"
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for pol, m in entry["policies"].items():
            c1k = "-" if m["cost_per_1k_good"] is None else f"{m['cost_per_1k_good']:.3f}"
            warm = m.get("after_warmup") or {}
            w1k = "-" if warm.get("cost_per_1k_good") is None else f"{warm['cost_per_1k_good']:.3f}"
            watt = "-" if warm.get("slo_attainment") is None else f"{warm['slo_attainment']:.3f}"
            lines.append(
                f"| {pol} | {m['slo_attainment']:.3f} | {c1k} | {m['cost_per_hour']:.2f} | "
                f"{m['scale_actions']} | {watt} | {w1k} | {_windows(m.get('windows'))} | {m['fleet']} |"
            )
        r = entry["ratios"]
        v = entry["goals_met"]
        lines += [
            "",
            "Tandem cost per 1k good vs: "
            + ", ".join(
                f"{b} {'-' if r[b] is None else f'{r[b]:.2f}x'} (goal <= {g}x: {_yes(v[f'vs_{b}'])})"
                for b, g in GOALS.items()
            )
            + f"; attainment >= target: {_yes(v['attainment'])}.",
            "",
        ]
        short = [
            b for b in GOALS if b in entry["policies"] and entry["policies"][b]["slo_attainment"] < target
        ]
        if short:
            lines += [
                "Below the attainment target: "
                + ", ".join(f"{b} ({entry['policies'][b]['slo_attainment']:.3f})" for b in short)
                + ". Cost per good request counts only the requests served within the SLO, so the "
                "ratio against a policy below the target is not a comparison at equal attainment.",
                "",
            ]
        warm_r = entry.get("ratios_after_warmup")
        if warm_r:
            lines += [
                f"After the first {entry['warmup_s']:.0f} s only (not the goal's measure): "
                + ", ".join(f"{b} {'-' if warm_r[b] is None else f'{warm_r[b]:.2f}x'}" for b in GOALS)
                + ".",
                "",
            ]
    return "\n".join(lines)


def _windows(w: Mapping[str, Any] | None) -> str:
    """``3/4 (0.734)``: windows whose attainment met the target, of all, and the lowest."""
    if not w or not w.get("count"):
        return "-"
    return f"{w['meeting_target']}/{w['count']} ({w['lowest_attainment']:.3f})"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def plot(name: str, trace: Sequence[TraceRequest], runs: Mapping[str, PolicyRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max((r.result.simulated_seconds for r in runs.values()), default=1.0)
    bins = max(1, int(end // 60) + 1)
    load = [0] * bins
    for req in trace:
        load[min(bins - 1, int(req.arrival // 60))] += 1
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), sharex=True, squeeze=False)
    for ax, (pol, run) in zip(axes[:, 0], runs.items(), strict=False):
        for pool, points in run.result.timelines.items():
            if not any(total for _, _, total in points):
                continue
            xs = [t / 60 for t, _, _ in points] + [end / 60]
            ys = [total for _, _, total in points] + [points[-1][2]]
            ax.step(xs, ys, where="post", label=pool)
        ax.set_ylabel("replicas")
        ax.set_title(f"{pol}: attainment {run.result.slo_attainment:.3f}", fontsize=9)
        ax.legend(fontsize=6, loc="upper left", ncol=3)
        twin = ax.twinx()
        twin.plot([i + 0.5 for i in range(bins)], [c / 60 for c in load], color="grey", alpha=0.4, lw=1)
        twin.set_ylabel("req/s", fontsize=7)
    axes[-1, 0].set_xlabel("minutes")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Across traces: Tandem's lowest attainment (and where), and per baseline the geometric
    mean of the cost ratios (over the traces where both costs are known)."""
    out: dict[str, Any] = {}
    mine = {n: e["policies"]["tandem"] for n, e in entries.items() if "tandem" in e["policies"]}
    attained = {n: m["slo_attainment"] for n, m in mine.items()}
    if attained:
        worst = min(attained, key=lambda n: attained[n])
        out["lowest_attainment"] = {"trace": worst, "slo_attainment": attained[worst]}
    for base in GOALS:
        values = [e["ratios"][base] for e in entries.values() if e["ratios"].get(base)]
        if values:
            out[f"geomean_ratio_vs_{base}"] = round(math.exp(sum(map(math.log, values)) / len(values)), 3)
    return out


def run(
    traces: Mapping[str, Sequence[TraceRequest]], cfg: BenchConfig, out: Path, pngs: bool = True
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "slo": {"ttft_s": cfg.slo.ttft_s, "itl_s": cfg.slo.itl_s, "attainment": cfg.slo.attainment_target},
        "model": cfg.model.name,
        "baseline_accelerator": cfg.baseline_accelerator,
        "window_s": cfg.window_s,
        "traces": {},
    }
    for name, trace in traces.items():
        started = time.perf_counter()
        runs = run_trace(trace, cfg)
        policies = {pol: r.metrics(cfg.warmup_s, cfg.window_s) for pol, r in runs.items()}
        results["traces"][name] = {
            "requests": len(trace),
            "duration_s": trace[-1].arrival if trace else 0.0,
            "policies": policies,
            "ratios": ratios(policies),
            "warmup_s": cfg.warmup_s,
            "ratios_after_warmup": ratios(policies, warm=True),
            "goals_met": verdict(policies, cfg.slo.attainment_target),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        if pngs:
            plot(name, trace, runs, out / f"{name}.png")
        print(
            f"{name}: {json.dumps(policies.get('tandem', {}))} ratios={results['traces'][name]['ratios']}",
            flush=True,
        )
    results["summary"] = summary(results["traces"])
    print(f"summary: {json.dumps(results['summary'])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results, cfg.slo.attainment_target))
    return results


def parse_tuning(items: Sequence[str]) -> Tuning:
    """The planner's `Tuning` with ``KEY=VALUE`` overrides (values of the field's type);
    ValueError naming the key for an unknown knob or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(Tuning)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--tuning takes KEY=VALUE with KEY one of the planner's knobs, got {item!r}")
        default: Any = fields[key].default
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"--tuning {key} takes true or false, got {raw!r}")
            changes[key] = raw.lower() == "true"
        else:
            try:
                changes[key] = type(default)(raw)
            except ValueError:
                raise ValueError(f"--tuning {key} takes a {type(default).__name__}, got {raw!r}") from None
    return dataclasses.replace(Tuning(), **changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.bench", description=__doc__)
    p.add_argument("--trace", action="append", default=[], help="Azure CSV or Mooncake JSONL (repeatable)")
    p.add_argument(
        "--synthetic", action="store_true", help="also run the generated traces (shift, diurnal, bursts)"
    )
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds: with --synthetic, run each generated shape at these seeds "
        "instead of its default (held-out traces: e.g. 11,12,13)",
    )
    p.add_argument(
        "--resample-blocks",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --seeds, run each --trace as block-bootstrap resamples at those seeds (blocks of "
        "SECONDS drawn with replacement: held-out realisations of a recorded trace) instead of as recorded",
    )
    p.add_argument("--out", default="bench/out/planner")
    p.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated subset of " + ", ".join(POLICIES)
    )
    p.add_argument("--baseline-accelerator", default="h100")
    p.add_argument("--no-png", action="store_true")
    p.add_argument(
        "--tuning",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the planner's knobs (tandem.planner.types.Tuning; repeatable), "
        "e.g. pooled_servers_max=64",
    )
    args = p.parse_args(argv)
    try:
        tuning = parse_tuning(args.tuning)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    traces: dict[str, Sequence[TraceRequest]] = {}
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        print(f"error: --seeds takes comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    if args.resample_blocks < 0 or (args.resample_blocks and not seeds):
        print("error: --resample-blocks takes a positive length in seconds, and --seeds", file=sys.stderr)
        return 2
    try:
        for path in args.trace:
            recorded = load_trace(path)
            if args.resample_blocks:
                for seed in seeds:
                    drawn = resample_blocks(recorded, args.resample_blocks, seed)
                    traces[f"{trace_name(path)}-b{seed}"] = drawn
            else:
                traces[trace_name(path)] = recorded
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.synthetic and seeds:
        traces.update({f"{n}-{seed}": make(seed=seed) for n, make in SYNTHETIC.items() for seed in seeds})
    elif args.synthetic:
        traces.update({name: make() for name, make in SYNTHETIC.items()})
    if not traces:
        print("error: give --trace PATH and/or --synthetic", file=sys.stderr)
        return 2
    policies = tuple(x for x in args.policies.split(",") if x)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        print(f"error: unknown policies {sorted(unknown)}", file=sys.stderr)
        return 2
    cfg = BenchConfig(policies=policies, baseline_accelerator=args.baseline_accelerator, tuning=tuning)
    run(traces, cfg, Path(args.out), pngs=not args.no_png)
    print(f"wrote {args.out}/results.json, results.md" + ("" if args.no_png else " and PNG timelines"))
    return 0
