from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tandem.perf import get_accelerator, get_model, prefill_seconds
from tandem.sim.fleet import (
    SLO,
    FleetSpec,
    PoolSpec,
    RequestResult,
    SimConfig,
    SimResult,
    _Engine,
    _Req,
    simulate,
)
from tandem.sim.policies import PoolObservation, PoolState, QueuePolicy, RouterPolicy, StaticPolicy
from tandem.sim.trace import TraceRequest, load_trace, scale_rate, synthetic, window

MODEL = get_model("llama-3.1-70b", "fp8")
H100 = get_accelerator("h100")


def colocated(n: int) -> FleetSpec:
    return FleetSpec(MODEL, (PoolSpec("mixed", "mixed", H100, 2, n),))


def disaggregated(n_prefill: int, n_decode: int) -> FleetSpec:
    return FleetSpec(
        MODEL,
        (PoolSpec("prefill", "prefill", H100, 2, n_prefill), PoolSpec("decode", "decode", H100, 2, n_decode)),
    )


def test_single_request_latencies_match_the_perf_model() -> None:
    trace = [TraceRequest(0.0, 1000, 11)]
    result = simulate(trace, colocated(1), SLO(10, 1))
    req = result.requests[0]
    assert req.ttft == pytest.approx(prefill_seconds(H100, MODEL, 2, 1000))
    assert req.mean_itl is not None and 0.005 < req.mean_itl < 0.1
    assert req.e2e == pytest.approx(req.ttft + 10 * req.mean_itl)
    assert result.slo_attainment == 1.0


def test_split_path_pays_kv_transfer_and_first_decode_step() -> None:
    trace = [TraceRequest(0.0, 2000, 5)]
    at_decode = simulate(trace, disaggregated(1, 1), SLO(10, 1)).requests[0]
    at_prefill = simulate(
        trace, disaggregated(1, 1), SLO(10, 1), config=SimConfig(ttft_on_decode=False)
    ).requests[0]
    assert at_prefill.ttft == pytest.approx(prefill_seconds(H100, MODEL, 2, 2000))
    assert at_decode.ttft is not None and at_prefill.ttft is not None
    assert at_decode.ttft > at_prefill.ttft + 0.005  # transfer setup + one decode step
    assert at_decode.path == "split"


def test_fast_path_matches_token_by_token_arithmetic() -> None:
    # two requests join one decode instance at different times; completion must not
    # depend on how segments were cut
    trace = [TraceRequest(0.0, 100, 300), TraceRequest(0.5, 100, 50), TraceRequest(0.51, 100, 20)]
    result = simulate(trace, colocated(1), SLO(10, 1))
    assert result.completed == 3
    ends = [r.arrival + (r.e2e or 0) for r in result.requests]
    assert ends[2] < ends[1] < ends[0]


def test_mixed_interference_slows_decodes_sharing_iterations_with_prefill() -> None:
    decode_only = [TraceRequest(0.0, 200, 200)]
    with_prefills = decode_only + [TraceRequest(0.5 + 0.2 * i, 6000, 2) for i in range(10)]
    quiet = simulate(decode_only, colocated(1), SLO(10, 1)).requests[0].mean_itl
    noisy = simulate(with_prefills, colocated(1), SLO(10, 1)).requests[0].mean_itl
    assert quiet is not None and noisy is not None
    assert noisy > 1.5 * quiet


def test_router_threshold_splits_long_prompts_only() -> None:
    fleet = FleetSpec(
        MODEL,
        (
            PoolSpec("prefill", "prefill", H100, 2, 1),
            PoolSpec("decode", "decode", H100, 2, 1),
            PoolSpec("mixed", "mixed", H100, 2, 1),
        ),
    )
    trace = [TraceRequest(float(i), 4000 if i % 2 else 200, 10) for i in range(20)]
    result = simulate(trace, fleet, SLO(10, 1), router=RouterPolicy(split_threshold_tokens=1024))
    assert [r.path for r in result.requests] == ["mixed", "split"] * 10
    # a tiny queue limit sends everything co-located once prefill is busy
    burst = [TraceRequest(0.0, 4000, 10) for _ in range(10)]
    capped = simulate(burst, fleet, SLO(10, 1), router=RouterPolicy(1024, max_prefill_queue_tokens=1000))
    assert {r.path for r in capped.requests} == {"split", "mixed"}


def test_router_spills_split_requests_to_mixed_while_prefill_is_saturated() -> None:
    """Tandem's router sends a split request to a mixed replica while every prefill replica has
    its in-flight limit (``tandem.router.decide``); the simulator models the same rule."""
    fleet = FleetSpec(
        MODEL,
        (
            PoolSpec("prefill", "prefill", H100, 2, 1),
            PoolSpec("decode", "decode", H100, 2, 1),
            PoolSpec("mixed", "mixed", H100, 2, 1),
        ),
    )
    burst = [TraceRequest(0.01 * i, 4000, 10) for i in range(12)]
    plain = simulate(burst, fleet, SLO(10, 1), router=RouterPolicy(1024))
    assert {r.path for r in plain.requests} == {"split"}
    spill = simulate(burst, fleet, SLO(10, 1), router=RouterPolicy(1024, prefill_inflight_limit=4))
    paths = [r.path for r in spill.requests]
    assert paths[:4] == ["split"] * 4  # the prefill replica takes four before it counts as saturated
    assert "mixed" in paths[4:]
    # a full mixed replica takes no spill
    full = simulate(
        burst, fleet, SLO(10, 1), router=RouterPolicy(1024, prefill_inflight_limit=4, mixed_inflight_limit=2)
    )
    assert [r.path for r in full.requests].count("mixed") == 2


def test_a_spilled_request_goes_to_a_mixed_replica_with_room() -> None:
    """Like the router, the spill only goes to a mixed replica under its in-flight limit, even
    when a full one has the shortest prefill queue (found by review)."""
    fleet = FleetSpec(
        MODEL,
        (
            PoolSpec("prefill", "prefill", H100, 1, 1),
            PoolSpec("decode", "decode", H100, 1, 1),
            PoolSpec("mixed", "mixed", H100, 2, 2),
        ),
    )
    engine = _Engine([], fleet, RouterPolicy(1024, prefill_inflight_limit=4), None, SimConfig(), None)
    prefill = engine.pools[0].instances[0]
    full, busy = engine.pools[2].instances
    for i in range(4):  # the prefill replica is at its limit
        prefill.pq.append(_Req(100 + i, TraceRequest(0.0, 4000, 10)))
        prefill.pq_tokens += 4000
    prefill.busy = True
    full.running.extend((10**6, 200 + i, _Req(200 + i, TraceRequest(0.0, 100, 10))) for i in range(20))
    full.busy = True  # 20 decoding, nothing queued: the shortest queue, but over the limit of 16
    busy.pq.append(_Req(300, TraceRequest(0.0, 8000, 10)))
    busy.pq_tokens = 8000
    busy.busy = True
    request = _Req(0, TraceRequest(0.0, 4000, 10))
    engine.route(request, 0.0)
    assert request.path == "mixed"
    assert request in busy.pq and full.inflight() == 20


def test_cost_and_device_hours() -> None:
    trace = [TraceRequest(float(i), 500, 20) for i in range(3601)]
    result = simulate(trace, disaggregated(1, 2), SLO(10, 1))
    assert result.device_hours == pytest.approx(6.0, rel=0.01)  # 3 instances x TP2 x 1 h
    assert result.cost == pytest.approx(6.0 * 3.0, rel=0.01)
    assert result.cost_per_1k_good == pytest.approx(result.cost / result.slo_met * 1000)
    assert result.goodput == pytest.approx(result.slo_met / 3600)


def test_cost_and_attainment_after_a_start() -> None:
    trace = [TraceRequest(float(i), 500, 20) for i in range(3601)]
    result = simulate(trace, disaggregated(1, 2), SLO(10, 1))
    assert result.cost_from(0.0) == pytest.approx(result.cost)
    assert result.cost_from(1800.0) == pytest.approx(result.cost / 2, rel=0.01)
    attainment, per_1k = result.after(1800.0)
    late = [r for r in result.requests if r.arrival >= 1800.0]
    met = sum(r.meets(result.slo) for r in late)
    assert attainment == pytest.approx(met / len(late))
    assert per_1k == pytest.approx(result.cost_from(1800.0) / met * 1000)


def test_the_bill_after_a_start_counts_replicas_added_later() -> None:
    trace = synthetic(600, 5.0, 1000, 50, seed=3)
    result = simulate(
        trace, colocated(1), SLO(2, 0.1), autoscaler=_Recorder(target=3), config=SimConfig(30.0, 60.0)
    )
    end = result.simulated_seconds
    start = end / 2
    assert start > 30.0
    # one replica from 0 s, two more from the 30 s decision: all three billed from ``start``
    assert result.cost_from(start) == pytest.approx(3 * (end - start) / 3600 * 2 * H100.price_per_hour)
    assert result.cost_from(start) < result.cost


def test_long_prompts_tight_itl_disaggregation_beats_colocation_at_equal_cost() -> None:
    # DistServe (arXiv 2401.09670) / TaiChi (arXiv 2508.01989): loose TTFT, strict TPOT favours P/D.
    trace = synthetic(1200, 2.0, 6000, 200, seed=1)
    slo = SLO(ttft_s=5.0, itl_s=0.05)
    co, dis = simulate(trace, colocated(8), slo), simulate(trace, disaggregated(4, 4), slo)
    assert co.cost == pytest.approx(dis.cost, rel=0.02)
    assert dis.goodput > 1.2 * co.goodput
    assert dis.slo_attainment >= 0.9 > co.slo_attainment


def test_short_prompts_tight_ttft_colocation_beats_disaggregation_at_equal_cost() -> None:
    # TaiChi: strict TTFT with loose TPOT favours aggregation (97 % vs 42 % attainment);
    # llm-d's P/D guide: disaggregation is not for short prompts.
    trace = synthetic(4000, 40.0, 200, 100, seed=2)
    slo = SLO(ttft_s=0.15, itl_s=0.25)
    co, dis = simulate(trace, colocated(8), slo), simulate(trace, disaggregated(4, 4), slo)
    assert co.cost == pytest.approx(dis.cost, rel=0.02)
    assert co.goodput > 1.1 * dis.goodput
    assert co.slo_attainment >= 0.9 > dis.slo_attainment


class _Recorder:
    name = "recorder"

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.seen: list[tuple[float, dict[str, PoolState]]] = []

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        self.seen.append((now, dict(pools)))
        return {"mixed": self.target}


def test_autoscaler_hook_gets_observations_and_startup_delay_applies() -> None:
    trace = synthetic(600, 5.0, 1000, 50, seed=3)
    policy = _Recorder(target=3)
    result = simulate(trace, colocated(1), SLO(2, 0.1), autoscaler=policy, config=SimConfig(30.0, 60.0))
    now, pools = policy.seen[0]
    assert now == 30.0
    obs = pools["mixed"].observation
    assert obs.requests_per_s is not None and obs.requests_per_s > 0
    assert obs.prompt_tokens_per_s is not None and obs.prompt_tokens_per_s > 0
    assert obs.kv_usage is not None and 0 <= obs.kv_usage <= 1
    assert pools["mixed"].replicas == 1 and pools["mixed"].ready == 1
    timeline = result.timelines["mixed"]
    assert (30.0, 1, 3) in timeline and (90.0, 3, 3) in timeline  # ready after the 60 s delay
    later = next(p["mixed"] for t, p in policy.seen if t >= 90.0)
    assert later.ready == 3 and later.starting == 0


def test_static_policy_keeps_the_fleet_and_matches_no_autoscaler() -> None:
    trace = synthetic(300, 3.0, 1000, 50, seed=4)
    a = simulate(trace, colocated(2), SLO(2, 0.1))
    b = simulate(trace, colocated(2), SLO(2, 0.1), autoscaler=StaticPolicy())
    assert [r.e2e for r in a.requests] == [r.e2e for r in b.requests]
    assert b.timelines["mixed"] == [(0.0, 2, 2)]


def test_queue_policy_scales_up_under_overload_and_down_when_quiet() -> None:
    busy = synthetic(1500, 10.0, 3000, 100, seed=5)
    quiet = [
        r._replace(arrival=r.arrival + 150 + 3 * i) for i, r in enumerate(synthetic(200, 1.0, 100, 5, seed=6))
    ]
    spec = FleetSpec(MODEL, (PoolSpec("mixed", "mixed", H100, 2, 2, min_replicas=1, max_replicas=6),))
    result = simulate(busy + quiet, spec, SLO(2, 0.1), autoscaler=QueuePolicy(), config=SimConfig(30.0, 30.0))
    totals = [total for _, _, total in result.timelines["mixed"]]
    assert max(totals) > 2
    assert totals[-1] < max(totals)


def test_queue_policy_decisions_table() -> None:
    from tandem.sim.policies import PoolObservation

    def state(waiting: float | None, kv: float, replicas: int = 2, starting: int = 0) -> dict[str, PoolState]:
        obs = PoolObservation(waiting, 0.0, kv, 0.0, 0.0, 0.0, None, None)
        return {
            "p": PoolState("p", "decode", "h100", 1, 3.0, replicas, replicas - starting, starting, 1, 4, obs)
        }

    policy = QueuePolicy(quiet_intervals=2)
    assert policy.decide(0, state(10, 0.1))["p"] == 3
    assert policy.decide(0, state(10, 0.1, replicas=4))["p"] is None  # at max
    assert policy.decide(0, state(10, 0.1, starting=1))["p"] is None  # pending
    assert policy.decide(0, state(None, 0.0))["p"] is None  # no data
    assert policy.decide(0, state(0, 0.9))["p"] == 3  # KV pressure
    assert policy.decide(0, state(0, 0.1))["p"] is None
    assert policy.decide(30, state(0, 0.1))["p"] == 1


def test_trace_loaders_scaling_and_windows(tmp_path: Path) -> None:
    azure = tmp_path / "a.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:05.0000000,100,20\n"
    )
    trace = load_trace(azure)
    assert trace[0] == TraceRequest(0.0, 4808, 10)
    assert trace[1].arrival == pytest.approx(1.02004)
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"timestamp": 1000, "input_length": 7, "output_length": 3, "hash_ids": [1]},
                {"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [2]},
            ]
        )
    )
    m = load_trace(mooncake)
    assert m == [TraceRequest(0.0, 5, 2), TraceRequest(1.0, 7, 3)]
    assert scale_rate(m, 2.0)[1].arrival == 0.5
    assert window(m, 0.5, 1.0) == [TraceRequest(0.5, 7, 3)]


def test_shipped_azure_code_trace_loads() -> None:
    # shared/ sits beside the repository (on CI too)
    path = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure-llm-2023-code.csv"
    if not path.exists():
        pytest.skip(f"shipped trace not present at {path}")
    trace = load_trace(path)
    assert len(trace) == 8819
    assert 3300 < trace[-1].arrival < 3500
    assert sum(r.prompt_tokens for r in trace) / len(trace) == pytest.approx(2048, rel=0.01)


@dataclass
class _ClientRecorder:
    """A policy that reads the clients' first tokens as well as the pools' (ObservesClients)."""

    name: str = "clients"
    clients: list[tuple[tuple[tuple[float, float], ...], float | None]] = field(default_factory=list)
    pools: list[dict[str, PoolState]] = field(default_factory=list)
    arrivals: list[PoolObservation | None] = field(default_factory=list)

    def observe_clients(
        self,
        ttft_buckets: tuple[tuple[float, float], ...],
        mean_ttft_s: float | None,
        arrivals: PoolObservation | None = None,
    ) -> None:
        self.clients.append((ttft_buckets, mean_ttft_s))
        self.arrivals.append(arrivals)

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        self.pools.append(dict(pools))
        return {}


def test_a_prefill_pool_reports_its_engines_ttft_and_policies_may_read_the_clients() -> None:
    """As vLLM: a prefill instance's first token comes at the end of its prefill (its
    max_tokens=1 request), before the KV hand-off and the decode replica's first step that
    the client waits for; policies that read the router's histogram get the clients' TTFT."""
    trace = [TraceRequest(float(i), 2000, 5) for i in range(40)]  # one every second: no queue
    policy = _ClientRecorder()
    result = simulate(trace, disaggregated(1, 1), SLO(10, 1), autoscaler=policy, config=SimConfig(30.0, 60.0))
    engine = policy.pools[0]["prefill"].observation.mean_ttft_s
    buckets, client = policy.clients[0]
    assert engine == pytest.approx(prefill_seconds(H100, MODEL, 2, 2000))
    assert client is not None and engine is not None and client > engine + 0.005
    window = [r.ttft or 0.0 for r in result.requests if r.arrival < 30.0]  # first tokens by the tick
    assert client == pytest.approx(sum(window) / len(window))
    assert buckets[-1] == (math.inf, pytest.approx(30 / 30.0))  # every first token of the window
    # a policy that does not read clients keeps the old interface
    plain = _Recorder(target=1)
    simulate(trace, colocated(1), SLO(10, 1), autoscaler=plain, config=SimConfig(30.0, 60.0))
    assert plain.seen and not hasattr(plain, "observe_clients")


def test_pools_count_finished_requests_and_the_router_counts_arrivals() -> None:
    """As vLLM: an engine counts a request (request_success_total, request_prompt_tokens)
    when it finishes, so a pool's reading trails a burst by the requests' latency; the
    router counts each prompt as it arrives, and what it sends each pool."""
    burst = [TraceRequest(i / 60.0, 2000 + i, 900) for i in range(60)]  # 60 in one second, ~65 s each
    trace = [*burst, TraceRequest(100.0, 100, 1)]  # a late one keeps the ticks going
    policy = _ClientRecorder()
    simulate(trace, colocated(1), SLO(10, 1), autoscaler=policy, config=SimConfig(30.0, 60.0))
    first = policy.arrivals[0]
    assert first is not None and first.requests_per_s == pytest.approx(60 / 30.0)
    assert first.mean_prompt_tokens == pytest.approx(2000 + 59 / 2)
    assert first.prompt_tokens_buckets is not None and first.prompt_tokens_buckets[-1][1] == pytest.approx(
        2.0
    )
    mixed = [p["mixed"].observation for p in policy.pools]
    assert mixed[0].routed_per_s == pytest.approx(2.0)  # sent at once ...
    assert mixed[0].requests_per_s == 0.0 and mixed[0].mean_prompt_tokens is None  # ... none done yet
    assert mixed[1].requests_per_s == 0.0 and mixed[1].routed_per_s == 0.0  # still running at 60 s
    assert mixed[2].requests_per_s == pytest.approx(2.0)  # all 60 finished by the tick at 90 s
    assert mixed[2].mean_prompt_tokens == pytest.approx(2000 + 59 / 2)
    assert policy.arrivals[1] is not None and policy.arrivals[1].requests_per_s == 0.0
    assert policy.arrivals[1].mean_prompt_tokens is None and policy.arrivals[1].prompt_tokens_buckets is None


def test_on_the_split_path_each_request_is_counted_once_per_pool() -> None:
    """A split request is sent to a prefill replica (which finishes it with its prefill,
    max_tokens=1) and, unless one token was all it asked for, to a decode replica: each pool
    counts it once when the router sends it and once when it finishes there."""
    outputs = [1, 5, 0, 20, 1, 40] * 5
    trace = [TraceRequest(float(i), 1500, out) for i, out in enumerate(outputs)]
    trace.append(TraceRequest(200.0, 100, 1))  # a late one keeps the ticks going past the rest
    policy = _ClientRecorder()
    simulate(trace, disaggregated(1, 1), SLO(10, 1), autoscaler=policy, config=SimConfig(30.0, 60.0))

    def total(pool: str, field: str) -> float:
        return sum((getattr(p[pool].observation, field) or 0.0) * 30.0 for p in policy.pools)

    assert total("prefill", "routed_per_s") == pytest.approx(len(outputs))
    assert total("prefill", "requests_per_s") == pytest.approx(len(outputs))
    handed_over = sum(1 for out in outputs if out > 1)
    assert total("decode", "routed_per_s") == pytest.approx(handed_over)
    assert total("decode", "requests_per_s") == pytest.approx(handed_over)
    arrived = sum((a.requests_per_s or 0.0) * 30.0 for a in policy.arrivals if a is not None)
    assert arrived == pytest.approx(len(outputs))


def test_attainment_per_window_by_arrival() -> None:
    """Each window's share of SLO-met requests among those arriving in it, in time order;
    a window without arrivals is left out, and the whole run's attainment hides a bad one."""
    slo = SLO(1.0, 0.1)

    def req(at: float, ttft: float) -> RequestResult:
        return RequestResult(at, 100, 10, "mixed", ttft, 0.05, ttft + 0.5)

    requests = [req(10, 0.2), req(20, 0.3), req(30, 0.2), req(40, 0.2)]  # window 0: all met
    requests += [req(610, 0.2), req(620, 3.0)]  # window 1: half
    requests += [req(1810, 5.0), req(1820, 0.2), req(1830, 0.2), req(1840, 0.2)]  # window 3 (window 2: none)
    result = SimResult(colocated(1), slo, requests, 1900.0, 1900.0, 0.0, 0.0, 0.0, {})
    assert result.windows(600.0) == [1.0, 0.5, 0.75]
    assert result.slo_attainment == pytest.approx(0.8)
    assert result.windows(3600.0) == [pytest.approx(0.8)]
    with pytest.raises(ValueError):
        result.windows(0.0)
