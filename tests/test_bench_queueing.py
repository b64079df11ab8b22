"""The TTFT queueing prediction (`capacity.queue_attainment`) and the model-vs-simulator
comparison built on it (`tandem.bench.queueing`)."""

from __future__ import annotations

import json

import pytest

from tandem.bench import queueing
from tandem.planner import capacity


def test_prompts_slower_than_the_target_alone_never_meet_it() -> None:
    firsts = [(0.5, 0.5), (3.0, 0.5)]
    assert capacity.queue_attainment(firsts, 1.0, 2.0, 0.001) == pytest.approx(0.5, abs=1e-3)


def test_a_saturated_or_empty_pool_meets_nothing() -> None:
    firsts = [(0.5, 1.0)]
    assert capacity.queue_attainment(firsts, 1.0, 2.0, 1.0) == 0.0
    assert capacity.queue_attainment(firsts, 1.0, 2.0, 1.3) == 0.0
    assert capacity.queue_attainment([], 1.0, 2.0, 0.5) == 0.0


def test_attainment_falls_with_load_and_rises_with_pooling() -> None:
    firsts = [(0.3, 0.6), (0.9, 0.3), (1.8, 0.1)]
    loads = [0.1, 0.3, 0.5, 0.7, 0.9]
    alone = [capacity.queue_attainment(firsts, 1.0, 2.0, rho) for rho in loads]
    assert alone == sorted(alone, reverse=True) and alone[0] > alone[-1]
    for rho in loads:
        one = capacity.queue_attainment(firsts, 1.0, 2.0, rho, 1)
        five = capacity.queue_attainment(firsts, 1.0, 2.0, rho, 5)
        assert five >= one
    # M/M/1 at rho: an arrival waits with probability rho, exponentially with rate (1-rho)/S
    one_prompt = capacity.queue_attainment([(0.5, 1.0)], 1.0, 2.0, 0.5)
    assert one_prompt == pytest.approx(1 - 0.5 * 2.718281828 ** (-0.5 * 1.5), rel=1e-6)


def test_compare_replays_each_fleet_size_and_sizes_like_the_planner() -> None:
    report = queueing.compare("mi300x", 6000, 60, 1.5, [2, 8], duration_s=600, warmup_s=60)
    small, large = report.rows
    assert (small.replicas, large.replicas) == (2, 8)
    assert small.utilisation == pytest.approx(4 * large.utilisation)
    assert large.sim > small.sim  # the simulator's queue drains with more replicas
    assert large.sim_reachable is not None and large.sim_reachable > 0.95
    assert large.pooled >= large.per_replica
    assert 0.5 < report.reachable_share < 1.0  # 6,000-token prompts: some are out of reach
    assert report.sized_pooled is not None and report.sized_per_replica is not None
    assert report.sized_pooled < report.sized_per_replica
    text = queueing.markdown(report)
    assert f"| 8 | {large.utilisation:.2f} | {large.sim:.3f} | {large.sim_reachable:.3f} |" in text
    assert f"up to {report.longest_reachable} tokens" in text


def test_compare_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        queueing.compare("mi300x", 6000, 60, 0.0, [2])
    with pytest.raises(ValueError):
        queueing.compare("mi300x", 6000, 60, 1.0, [0])


def test_main_writes_json_and_refuses_a_bad_shape(tmp_path, capsys) -> None:
    out = tmp_path / "queue.json"
    assert queueing.main(["--shape", "b200:2000:100:1:1,3", "--duration", "300", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [row["replicas"] for row in data[0]["rows"]] == [1, 3]
    assert queueing.main(["--shape", "b200:2000:100"]) == 2
    assert queueing.main(["--shape", "nosuchchip:2000:100:1:1"]) == 2
    assert "error: --shape" in capsys.readouterr().err
