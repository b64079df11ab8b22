from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.sim.trace import synthetic


def test_perf_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "perf",
            "--accelerator",
            "h100",
            "--model",
            "llama-2-70b",
            "--tp",
            "8",
            "--prompt-tokens",
            "2048",
            "--batch",
            "32",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"prefill_ms", "decode_step_ms", "kv_bytes_per_token", "kv_capacity_tokens"} <= set(out)
    assert 100 < out["prefill_ms"] < 180  # Splitwise: 137 ms
    assert out["kv_bytes_per_token"] == 327_680


def test_perf_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "--accelerator", "mi300x", "--model", "llama-3.1-70b", "--dtype", "fp8"]) == 0
    assert "KV capacity" in capsys.readouterr().out
    assert main(["perf", "--accelerator", "tpu", "--model", "llama-3.1-8b"]) == 2
    assert main(["perf", "--accelerator", "l40s", "--model", "llama-3.1-405b"]) == 1


def _write_trace(path: Path) -> None:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for r in synthetic(200, 2.0, 1500, 30, seed=7):
        seconds = 3 + r.arrival
        lines.append(
            f"2023-11-16 18:{int(seconds // 60):02d}:{seconds % 60:010.7f},"
            f"{r.prompt_tokens},{r.output_tokens}"
        )
    path.write_text("\n".join(lines) + "\n")


def test_simulate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    _write_trace(trace)
    code = main(
        [
            "simulate",
            "--trace",
            str(trace),
            "--model",
            "llama-3.1-70b",
            "--dtype",
            "fp8",
            "--pool",
            "prefill:h100:1",
            "--pool",
            "decode:mi300x:1:tp1@1.5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("slo_attainment", "cost_per_1k_good", "simulated_seconds", "wall_seconds"):
        assert key in out
    assert out["requests"] == 200 and out["completed"] == 200


def test_simulate_rejects_bad_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    _write_trace(trace)
    assert main(["simulate", "--trace", str(trace), "--pool", "router:h100:1"]) == 2


def test_plan_writes_chart_and_recommends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    _write_trace(trace)
    chart = tmp_path / "plan.png"
    code = main(
        [
            "plan",
            "--trace",
            str(trace),
            "--model",
            "llama-3.1-8b",
            "--pool",
            "h100=4",
            "--pool",
            "l40s=4@0.9",
            "--chart",
            str(chart),
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] is not None
    assert out["recommended"]["hourly_cost"] <= out["best_colocated"]["hourly_cost"]
    assert out["recommended"]["hourly_cost"] <= out["best_homogeneous"]["hourly_cost"]
    assert chart.exists() and chart.stat().st_size > 1000
