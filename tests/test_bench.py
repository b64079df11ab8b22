"""The planner benchmark's output shape (tandem.bench), on a tiny trace."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tandem.bench import traces
from tandem.bench.cli import main, summary
from tandem.bench.run import BenchConfig, peak_demand, tandem_fleet, tandem_router
from tandem.planner.baselines import DynamoSla
from tandem.planner.policy import TandemPolicy, planner_spec_for_fleet
from tandem.planner.types import PoolObservation
from tandem.sim.fleet import simulate
from tandem.sim.policies import PoolState
from tandem.sim.trace import TraceRequest


def test_synthetic_traces_are_deterministic_and_shaped() -> None:
    assert traces.bursts() == traces.bursts()
    shift = traces.shift(duration_s=600.0)
    first = [r.prompt_tokens for r in shift if r.arrival < 300]
    second = [r.prompt_tokens for r in shift if r.arrival >= 300]
    assert sum(second) / len(second) > 3 * sum(first) / len(first)
    rate, isl, osl = peak_demand([TraceRequest(float(i), 100, 10) for i in range(120)], 60.0)
    assert rate == 1.0 and isl == 100 and osl == 10


def test_bench_writes_results_table_and_timelines(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.jsonl"
    rows = [{"timestamp": i * 500, "input_length": 1500 + 10 * i, "output_length": 50} for i in range(240)]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    code = main(["--trace", str(trace), "--out", str(out), "--policies", "tandem,colocated-hpa,static"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["traces"]["tiny"]["policies"]
    assert set(entry) == {"tandem", "colocated-hpa", "static"}
    for metrics in entry.values():
        assert 0.0 <= metrics["slo_attainment"] <= 1.0
        assert metrics["cost_per_hour"] > 0
        assert isinstance(metrics["scale_actions"], int)
        assert metrics["cost_per_1k_good"] is None or metrics["cost_per_1k_good"] > 0
        warm = metrics["after_warmup"]
        assert warm["from_s"] == 600.0 and 0.0 <= warm["slo_attainment"] <= 1.0
        assert warm["cost_per_1k_good"] is None or warm["cost_per_1k_good"] > 0
        windows = metrics["windows"]
        assert windows["seconds"] == 600.0 and windows["count"] >= 1
        assert 0 <= windows["meeting_target"] <= windows["count"]
        assert 0.0 <= windows["lowest_attainment"] <= metrics["slo_attainment"]
    assert set(results["traces"]["tiny"]["ratios_after_warmup"]) == {"colocated-hpa", "dynamo-sla", "oracle"}
    md = (out / "results.md").read_text()
    assert "| tandem |" in md and "After the first 600 s only" in md
    assert "Windows at target" in md
    w = entry["tandem"]["windows"]
    assert f"| {w['meeting_target']}/{w['count']} ({w['lowest_attainment']:.3f}) |" in md
    assert (out / "tiny.png").stat().st_size > 0


def test_bench_rejects_unknown_policies(tmp_path: Path) -> None:
    assert main(["--synthetic", "--out", str(tmp_path), "--policies", "nope"]) == 2


def test_held_out_seeds_and_the_summary(tmp_path: Path) -> None:
    """--seeds runs each synthetic shape at other seeds (held-out traces); the summary gives
    the lowest attainment and the geometric mean of each baseline ratio."""
    assert traces.bursts(seed=11) != traces.bursts()
    assert main(["--synthetic", "--seeds", "x", "--out", str(tmp_path)]) == 2

    def entry(attained: float, oracle: float) -> dict[str, Any]:
        ratios = {"oracle": oracle, "dynamo-sla": None}
        return {"policies": {"tandem": {"slo_attainment": attained}}, "ratios": ratios}

    entries = {"a": entry(0.95, 2.0), "b": entry(0.85, 0.5)}
    got = summary(entries)
    assert got["lowest_attainment"] == {"trace": "b", "slo_attainment": 0.85}
    assert got["geomean_ratio_vs_oracle"] == 1.0 and "geomean_ratio_vs_dynamo-sla" not in got


def test_block_resamples_keep_the_recorded_blocks_in_another_order() -> None:
    recorded = [TraceRequest(float(t), 100 + t, 10) for t in range(0, 1000, 7)]
    one = traces.resample_blocks(recorded, 100.0, seed=11)
    assert one == traces.resample_blocks(recorded, 100.0, seed=11)  # deterministic
    assert one != traces.resample_blocks(recorded, 100.0, seed=12) and one != recorded
    assert [r.arrival for r in one] == sorted(r.arrival for r in one)
    assert all(0.0 <= r.arrival < 1000.0 for r in one)
    by_prompt = {r.prompt_tokens: r.arrival for r in recorded}
    for r in one:  # every request is a recorded one, at its offset within its block
        assert r.prompt_tokens in by_prompt and r.arrival % 100.0 == by_prompt[r.prompt_tokens] % 100.0
    blocks = {int(r.arrival // 100) for r in one}
    recorded_blocks = [sorted(q.prompt_tokens for q in recorded if q.arrival // 100 == k) for k in range(10)]
    for b in blocks:  # each output block is one whole recorded block
        assert sorted(r.prompt_tokens for r in one if int(r.arrival // 100) == b) in recorded_blocks
    assert traces.resample_blocks([], 100.0, seed=1) == []


def test_resample_blocks_runs_each_seed_and_needs_seeds_and_a_positive_length(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.jsonl"
    rows = [{"timestamp": i * 500, "input_length": 1500 + 10 * i, "output_length": 50} for i in range(240)]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    args = ["--trace", str(trace), "--out", str(out), "--policies", "tandem", "--no-png"]
    assert main([*args, "--resample-blocks", "30", "--seeds", "1,2"]) == 0
    results = json.loads((out / "results.json").read_text())["traces"]
    assert set(results) == {"tiny-b1", "tiny-b2"}  # the resamples only, not the recorded trace
    assert all(0.0 <= e["policies"]["tandem"]["slo_attainment"] <= 1.0 for e in results.values())
    assert main([*args, "--resample-blocks", "300"]) == 2  # no --seeds
    assert main([*args, "--seeds", "1", "--resample-blocks", "-5"]) == 2


def test_tandem_and_dynamo_read_the_first_tokens_clients_see() -> None:
    """Tandem's planner counts its error budget on the router's TTFT (the clients'), and
    Dynamo's planner corrects its prefill model with its frontend's TTFT, not the prefill
    engine's (which ends before the KV hand-off)."""
    cfg = BenchConfig()
    trace = [TraceRequest(i * 0.5, 3000, 20) for i in range(240)]
    fleet = tandem_fleet(cfg)
    spec = planner_spec_for_fleet(fleet, cfg.slo, interval_s=30.0, split_threshold=512)
    tandem = TandemPolicy(spec)
    simulate(trace, fleet, cfg.slo, router=tandem_router(cfg), autoscaler=tandem, config=cfg.sim)
    sources = {d.signals.get("errorBudgetSource") for _, d in tandem.decisions}
    assert "router" in sources and "pools" not in sources
    dynamo = DynamoSla(fleet.pools[0], fleet.pools[3], cfg.model, cfg.slo)
    engine = PoolObservation(0.0, 0.0, 0.1, 3000.0, 0.0, 1.0, 0.5, None, mean_prompt_tokens=3000.0)
    quiet = PoolObservation(0.0, 0.0, 0.1, 0.0, 0.0, 0.0, None, None)
    pools = {
        p.name: PoolState(
            p.name, p.role, p.accelerator.name, 1, 1.0, 1, 1, 0, 0, 8, engine if i == 0 else quiet
        )
        for i, p in enumerate(fleet.pools)
    }
    dynamo.observe_clients(((math.inf, 1.0),), 1.7)
    dynamo.decide(30.0, pools)
    assert dynamo._acc["ttft"] == pytest.approx(30.0 * 1.7)  # the frontend's, not the engine's 0.5


def test_the_table_says_when_a_baseline_misses_the_attainment_target() -> None:
    """A baseline far below the target is not compared at equal attainment: the report says so."""
    from tandem.bench.cli import markdown

    def policy(att: float) -> dict[str, object]:
        return {
            "slo_attainment": att,
            "cost_per_1k_good": 1.0,
            "cost_per_hour": 1.0,
            "scale_actions": 0,
            "fleet": "f",
        }

    entry = {
        "requests": 10,
        "duration_s": 60.0,
        "policies": {
            "tandem": policy(0.95),
            "colocated-hpa": policy(0.93),
            "dynamo-sla": policy(0.001),
            "oracle": policy(0.9),
        },
        "ratios": {"colocated-hpa": 0.5, "dynamo-sla": 0.004, "oracle": 1.2},
        "goals_met": {
            "vs_colocated-hpa": True,
            "vs_dynamo-sla": True,
            "vs_oracle": False,
            "attainment": True,
        },
    }
    text = markdown({"slo": {"ttft_s": 2.0, "itl_s": 0.1}, "traces": {"t": entry}}, 0.9)
    assert "Below the attainment target: dynamo-sla (0.001)" in text
    assert "colocated-hpa (" not in text and "oracle (" not in text
