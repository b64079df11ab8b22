"""Queueing across a pool's replicas (M/M/c, ``Tuning.pooled_servers_max``): the Erlang C
formulas, the capacity per replica growing with the pool, the allocation that stays
consistent with its own counts, the gate on smooth arrivals, and the bench's --tuning."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.bench.cli import main, parse_tuning
from tandem.planner import Decision, PlannerSpec, PlannerState, Tuning, decide
from tandem.planner.capacity import capacity, erlang_c, max_load, predicted_ttft, wait_quantile
from tandem.planner.core import Demand, allocate_pooled, burst_floor, dispersion
from tandem.sim.trace import TraceRequest
from test_planner import MODEL, SPEC, fleet

POOLED = replace(SPEC, tuning=replace(SPEC.tuning, pooled_servers_max=64))


def test_erlang_c_matches_known_values() -> None:
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # one server: the wait probability is rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # B(2, 1) = 0.2, C = 0.2 / (1 - 0.5 * 0.8)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 4.0) == 1.0  # saturated: everyone waits
    # at the same utilisation, a larger pool makes fewer arrivals wait
    waits = [erlang_c(c, 0.8 * c) for c in (1, 2, 4, 8, 16)]
    assert waits == sorted(waits, reverse=True) and waits[-1] < 0.5


def test_the_wait_quantile_shrinks_with_servers_and_is_mm1_at_one() -> None:
    rho, service, q = 0.8, 1.0, 0.1
    assert wait_quantile(rho, service, q) == pytest.approx(service / (1 - rho) * math.log(rho / q))
    assert wait_quantile(rho, service, q, 1) == wait_quantile(rho, service, q)
    quantiles = [wait_quantile(rho, service, q, c) for c in (1, 2, 4, 8)]
    assert quantiles == sorted(quantiles, reverse=True) and quantiles[-1] < quantiles[0] / 4
    # so a pool may run its replicas hotter for the same target
    loads = [max_load(0.5, service, 2.0, q, 0.9, c) for c in (1, 2, 4, 8)]
    assert loads == sorted(loads) and loads[0] < 0.7 < loads[-1]


def test_capacity_per_replica_grows_with_the_pool_for_long_prompts() -> None:
    pool = SPEC.pool("prefill-mi300x")
    caps = [capacity(pool, MODEL, 6000, 60, 2.0, 0.1, 0.9, SPEC.tuning, servers=c).rps for c in (1, 2, 4, 8)]
    assert caps == sorted(caps) and caps[-1] > 2 * caps[0]
    assert caps[0] == capacity(pool, MODEL, 6000, 60, 2.0, 0.1, 0.9, SPEC.tuning).rps
    # the decode pool has no queue to pool: its capacity is the batch the ITL allows
    decode = SPEC.pool("decode-mi300x")
    assert capacity(decode, MODEL, 2000, 100, 2.0, 0.1, 0.9, SPEC.tuning, servers=8) == capacity(
        decode, MODEL, 2000, 100, 2.0, 0.1, 0.9, SPEC.tuning
    )
    # the modelled mean TTFT of a replica at a given rate falls when it is one of several
    one = predicted_ttft(pool, MODEL, 6000, 0.1)
    four = predicted_ttft(pool, MODEL, 6000, 0.1, servers=4)
    assert one is not None and four is not None and four < one


def _smooth(spec: PlannerSpec, rate: float, intervals: int = 30) -> PlannerState:
    """A state that saw ``rate`` +- 5% (Poisson-like: dispersion well below 10) for a while."""
    st = PlannerState()
    for i in range(intervals):
        burst_floor(spec, st, rate * (1.05 if i % 2 else 0.95), spec.interval_s * (i + 1))
    return st


def test_the_pooled_allocation_covers_the_rate_at_its_own_counts_with_fewer_replicas() -> None:
    pools = POOLED.by_role("prefill")
    demand = Demand(rate=1.5, observed=1.5, isl=6000, osl=60)
    smooth = _smooth(POOLED, 1.5)
    index = dispersion(POOLED, smooth)
    assert index is not None and index < POOLED.tuning.burst_dispersion
    alone, _, _ = allocate_pooled(SPEC, pools, demand, smooth)  # default: one server per replica
    pooled, short, caps = allocate_pooled(POOLED, pools, demand, smooth)
    assert not short and sum(pooled.values()) < sum(alone.values())
    own = {
        p.name: capacity(p, MODEL, 6000, 60, 2.0, 0.1, 0.9, POOLED.tuning, servers=max(1, pooled[p.name]))
        for p in pools
    }
    assert sum(n * own[k].rps for k, n in pooled.items()) >= 1.5 - 1e-9
    assert caps == own
    # bursty arrivals (a 20x interval every tenth): one server per replica, as without the knob
    bursty = PlannerState()
    for i in range(30):
        burst_floor(POOLED, bursty, 20.0 if i % 10 == 9 else 1.0, POOLED.interval_s * (i + 1))
    assert allocate_pooled(POOLED, pools, demand, bursty)[0] == alone
    # and before ``burst_min_intervals`` intervals were watched
    assert allocate_pooled(POOLED, pools, demand, _smooth(POOLED, 1.5, intervals=5))[0] == alone


def _prefill_replicas(decision: Decision) -> int:
    return sum(int(decision.signals[f"{p.name}.recommended"]) for p in SPEC.by_role("prefill"))


def test_decide_plans_fewer_prefill_replicas_for_smooth_long_prompts_when_pooled() -> None:
    obs = fleet(split_rps=1.5, replicas=(4, 0, 1, 1), isl=6000)
    now = SPEC.interval_s * 31
    alone = decide(SPEC, obs, _smooth(SPEC, 1.5), now)
    pooled = decide(POOLED, obs, _smooth(POOLED, 1.5), now)
    assert _prefill_replicas(pooled) < _prefill_replicas(alone)
    per_replica = "prefill-mi300x.capacityRps"
    assert float(pooled.signals[per_replica]) > float(alone.signals[per_replica])


def test_bench_tuning_overrides_are_parsed_and_checked(tmp_path: Path) -> None:
    assert parse_tuning([]) == Tuning()
    tuned = parse_tuning(["pooled_servers_max=16", "ttft_headroom=0.8", "extreme_splits=false"])
    assert (tuned.pooled_servers_max, tuned.ttft_headroom, tuned.extreme_splits) == (16, 0.8, False)
    for bad in (["nope=1"], ["pooled_servers_max"], ["pooled_servers_max=x"], ["extreme_splits=maybe"]):
        with pytest.raises(ValueError, match="--tuning"):
            parse_tuning(bad)
    trace = tmp_path / "tiny.jsonl"
    rows = (TraceRequest(i * 2.0, 500, 20) for i in range(20))
    trace.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": r.arrival * 1000,
                    "input_length": r.prompt_tokens,
                    "output_length": r.output_tokens,
                }
            )
            + "\n"
            for r in rows
        )
    )
    args = ["--trace", str(trace), "--policies", "tandem", "--no-png", "--out", str(tmp_path / "o")]
    assert main([*args, "--tuning", "nope=1"]) == 2
    assert main([*args, "--tuning", "pooled_servers_max=8"]) == 0
