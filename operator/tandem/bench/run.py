"""Run every policy on every trace with one catalog, one price list and one SLO.

Setup (all policies): Llama-3.1-70B in FP8, one device per replica (TP1; every catalog part
below holds >= 32k tokens of KV at TP1), SLO = the CRD defaults (TTFT 2 s, mean ITL 0.1 s,
90 % attainment), catalog prices (tandem.perf.catalog), a 30 s autoscaling tick and 120 s
replica start-up. Dynamic policies start from one replica per pool they use.

* ``tandem``: Tandem's planner on heterogeneous pools: prefill on MI300X/H100/B200, decode
  on MI300X/Gaudi 3/H200, mixed on MI300X/H100 (max 8 replicas each, min 0), behind
  Tandem's router as the simulator models it (the planner's split threshold, and a split
  request spilling to a mixed replica while every prefill replica has its in-flight limit).
* ``colocated-hpa``, ``dynamo-sla``, ``saturation``, ``static``: one SKU
  (``baseline_accelerator``, H100 by default: the part those stacks are documented on).
* ``oracle``: the cheapest static fleet that meets the attainment target on the whole
  trace, searched with :class:`tandem.sim.plan.Planner` over co-located and P/D shapes on
  the same catalog (a bound, not a policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from tandem.perf.catalog import Accelerator, get_accelerator
from tandem.perf.models import ModelArch, get_model
from tandem.planner.baselines import ColocatedHpa, DynamoSla, Saturation, dynamo_replicas
from tandem.planner.policy import TandemPolicy, planner_spec_for_fleet
from tandem.planner.types import Tuning
from tandem.router.config import DEFAULT_MIXED_INFLIGHT_PER_REPLICA, DEFAULT_PREFILL_INFLIGHT_PER_REPLICA
from tandem.sim.fleet import SLO, FleetSpec, PoolSpec, SimConfig, SimResult, simulate
from tandem.sim.plan import Offer, Planner
from tandem.sim.policies import AutoscalePolicy, RouterPolicy
from tandem.sim.trace import TraceRequest

POLICIES = ("tandem", "colocated-hpa", "dynamo-sla", "saturation", "static", "oracle")
TANDEM_POOLS: dict[str, tuple[str, ...]] = {
    "prefill": ("mi300x", "h100", "b200"),
    "decode": ("mi300x", "gaudi3", "h200"),
    "mixed": ("mi300x", "h100"),
}
ORACLE_OFFERS = ("mi300x", "h100", "gaudi3", "b200")


@dataclass(frozen=True)
class BenchConfig:
    model: ModelArch = field(default_factory=lambda: get_model("llama-3.1-70b", "fp8"))
    slo: SLO = field(default_factory=lambda: SLO(2.0, 0.1, 0.9))
    baseline_accelerator: str = "h100"
    max_per_pool: int = 8
    baseline_max: int = 32
    sim: SimConfig = field(default_factory=lambda: SimConfig(30.0, 120.0))
    split_threshold: int = 512  # routing.minPromptTokens default of the CRD
    policies: tuple[str, ...] = POLICIES
    tuning: Tuning = field(default_factory=Tuning)
    # The headline covers the whole trace. Dynamic policies start from one replica per pool
    # and the oracle from its whole fleet, so the report also scores the requests arriving
    # after this many seconds (five 120 s start-ups), against the bill from then on.
    warmup_s: float = 600.0
    # Windows over which the report also judges attainment (an SLO is often judged per window:
    # the whole trace's attainment lets one window's surplus pay for another's misses).
    window_s: float = 600.0


@dataclass
class PolicyRun:
    policy: str
    result: SimResult
    fleet: FleetSpec
    thresholds: list[tuple[float, int]] = field(default_factory=list)

    def metrics(self, warmup_s: float = 600.0, window_s: float = 600.0) -> dict[str, Any]:
        r = self.result
        hours = max(r.simulated_seconds, 1e-9) / 3600.0
        late_attainment, late_cost = r.after(warmup_s)
        windows = r.windows(window_s)
        return {
            "slo_attainment": round(r.slo_attainment, 4),
            "cost_per_1k_good": round(r.cost_per_1k_good, 4) if math.isfinite(r.cost_per_1k_good) else None,
            "cost_per_hour": round(r.cost / hours, 3),
            "scale_actions": scale_actions(r),
            "cost": round(r.cost, 3),
            "requests": len(r.requests),
            "fleet": self.fleet.describe(),
            "after_warmup": {
                "from_s": warmup_s,
                "slo_attainment": round(late_attainment, 4),
                "cost_per_1k_good": round(late_cost, 4) if math.isfinite(late_cost) else None,
            },
            "windows": {
                "seconds": window_s,
                "count": len(windows),
                "meeting_target": sum(1 for a in windows if a >= r.slo.attainment_target),
                "lowest_attainment": round(min(windows), 4) if windows else None,
            },
        }


def scale_actions(result: SimResult) -> int:
    """Changes of a pool's desired replica count during the run."""
    count = 0
    for points in result.timelines.values():
        totals = [total for _, _, total in points]
        count += sum(1 for a, b in pairwise(totals) if a != b)
    return count


def _pool(name: str, role: str, acc: Accelerator, replicas: int, lo: int, hi: int) -> PoolSpec:
    return PoolSpec(name, role, acc, 1, replicas, min_replicas=lo, max_replicas=hi)  # type: ignore[arg-type]


def tandem_fleet(cfg: BenchConfig) -> FleetSpec:
    pools: list[PoolSpec] = []
    for role, names in TANDEM_POOLS.items():
        for i, name in enumerate(names):
            pools.append(
                _pool(f"{role}-{name}", role, get_accelerator(name), 1 if i == 0 else 0, 0, cfg.max_per_pool)
            )
    return FleetSpec(cfg.model, tuple(pools))


def _pd_fleet(cfg: BenchConfig, num_p: int, num_d: int) -> FleetSpec:
    acc = get_accelerator(cfg.baseline_accelerator)
    return FleetSpec(
        cfg.model,
        (
            _pool("prefill", "prefill", acc, num_p, 1, cfg.baseline_max),
            _pool("decode", "decode", acc, num_d, 1, cfg.baseline_max),
        ),
    )


def peak_demand(trace: Sequence[TraceRequest], window_s: float = 60.0) -> tuple[float, float, float]:
    """(peak requests/s over ``window_s`` windows, mean ISL, mean OSL) of a trace."""
    counts: dict[int, int] = {}
    for r in trace:
        key = int(r.arrival // window_s)
        counts[key] = counts.get(key, 0) + 1
    n = max(1, len(trace))
    isl = sum(r.prompt_tokens for r in trace) / n
    osl = sum(r.output_tokens for r in trace) / n
    return max(counts.values(), default=0) / window_s, isl, osl


def _run(
    trace: Sequence[TraceRequest],
    fleet: FleetSpec,
    cfg: BenchConfig,
    policy: AutoscalePolicy | None,
    name: str,
    router: RouterPolicy | None = None,
) -> PolicyRun:
    result = simulate(
        trace,
        fleet,
        cfg.slo,
        router=router or RouterPolicy(cfg.split_threshold),
        autoscaler=policy,
        config=cfg.sim,
    )
    return PolicyRun(name, result, fleet, result.split_thresholds)


def tandem_router(cfg: BenchConfig) -> RouterPolicy:
    """Tandem's router as the simulator models it: the threshold, and the spill of split
    requests to a mixed replica while every prefill replica is saturated, at the router's
    default limits. (No baseline has both paths, so the spill applies to Tandem alone.)"""
    return RouterPolicy(
        cfg.split_threshold,
        prefill_inflight_limit=DEFAULT_PREFILL_INFLIGHT_PER_REPLICA,
        mixed_inflight_limit=DEFAULT_MIXED_INFLIGHT_PER_REPLICA,
    )


def run_tandem(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    fleet = tandem_fleet(cfg)
    spec = planner_spec_for_fleet(
        fleet,
        cfg.slo,
        interval_s=cfg.sim.autoscale_interval_s,
        split_threshold=cfg.split_threshold,
        tuning=cfg.tuning,
    )
    return _run(trace, fleet, cfg, TandemPolicy(spec, keep_decisions=False), "tandem", tandem_router(cfg))


def run_hpa(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    acc = get_accelerator(cfg.baseline_accelerator)
    fleet = FleetSpec(cfg.model, (_pool("mixed", "mixed", acc, 1, 1, cfg.baseline_max),))
    return _run(trace, fleet, cfg, ColocatedHpa(), "colocated-hpa")


def run_dynamo(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    fleet = _pd_fleet(cfg, 1, 1)
    policy = DynamoSla(fleet.pools[0], fleet.pools[1], cfg.model, cfg.slo)
    return _run(trace, fleet, cfg, policy, "dynamo-sla")


def run_saturation(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    return _run(trace, _pd_fleet(cfg, 1, 1), cfg, Saturation(), "saturation")


def run_static(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    rps, isl, osl = peak_demand(trace)
    probe = _pd_fleet(cfg, 1, 1)
    num_p, num_d = dynamo_replicas(probe.pools[0], probe.pools[1], cfg.model, cfg.slo, rps, isl, osl)
    return _run(trace, _pd_fleet(cfg, num_p, num_d), cfg, None, "static")


def run_oracle(trace: Sequence[TraceRequest], cfg: BenchConfig) -> PolicyRun:
    offers = [Offer(get_accelerator(name), cfg.max_per_pool) for name in ORACLE_OFFERS]
    plan = Planner(
        trace, cfg.model, cfg.slo, offers, router=RouterPolicy(cfg.split_threshold), config=cfg.sim
    ).run()
    best = plan.recommended
    if best is None:  # nothing met the target: report the best attainment seen
        cand = max(plan.candidates, key=lambda c: (c.result.slo_attainment, -c.hourly_cost))
        return PolicyRun("oracle", cand.result, cand.fleet)
    return PolicyRun("oracle", best.result, best.fleet)


RUNNERS: dict[str, Callable[[Sequence[TraceRequest], BenchConfig], PolicyRun]] = {
    "tandem": run_tandem,
    "colocated-hpa": run_hpa,
    "dynamo-sla": run_dynamo,
    "saturation": run_saturation,
    "static": run_static,
    "oracle": run_oracle,
}


def run_trace(trace: Sequence[TraceRequest], cfg: BenchConfig) -> dict[str, PolicyRun]:
    return {name: RUNNERS[name](trace, cfg) for name in cfg.policies}
