"""Tandem's planner behind the simulator's :class:`~tandem.sim.policies.AutoscalePolicy`.

The simulator hands one :class:`~tandem.sim.policies.PoolState` per pool each interval;
this adapter turns them into an :class:`~tandem.planner.types.Observation`, calls the pure
:func:`~tandem.planner.core.decide`, keeps the returned state, and exposes the split
threshold to the simulator's router (:class:`~tandem.sim.policies.TunesRouting`). The
operator does the same with readings from Prometheus and the Deployments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tandem.planner.core import decide
from tandem.planner.types import (
    Decision,
    Observation,
    PlannerSpec,
    PlannerState,
    PoolObservation,
    PoolReading,
    PoolTarget,
    Tuning,
)
from tandem.sim.fleet import SLO, FleetSpec
from tandem.sim.policies import PoolState


def observation_from_states(
    pools: Mapping[str, PoolState],
    client_ttft_buckets: tuple[tuple[float, float], ...] | None = None,
    arrivals: PoolObservation | None = None,
) -> Observation:
    return Observation(
        {
            name: PoolReading(replicas=p.replicas, ready=p.ready, starting=p.starting, metrics=p.observation)
            for name, p in pools.items()
        },
        client_ttft_buckets=client_ttft_buckets,
        arrivals=arrivals,
    )


def planner_spec_for_fleet(
    fleet: FleetSpec,
    slo: SLO,
    *,
    interval_s: float = 30.0,
    split_threshold: int = 512,
    max_devices: int | None = None,
    max_cost_per_hour: float | None = None,
    tuning: Tuning | None = None,
) -> PlannerSpec:
    """The planner's spec for a simulated fleet (the operator builds it from the CRDs)."""
    pools = tuple(
        PoolTarget(
            name=p.name,
            role=p.role,
            accelerator=p.accelerator,
            tp=p.tp,
            min_replicas=p.min_replicas,
            max_replicas=p.max_replicas,
            price_per_hour=p.tp * p.device_price,
            max_batch_tokens=p.max_batch_tokens,
            max_seqs=p.max_seqs,
        )
        for p in fleet.pools
    )
    return PlannerSpec(
        model=fleet.model,
        pools=pools,
        ttft_s=slo.ttft_s,
        itl_s=slo.itl_s,
        attainment=slo.attainment_target,
        interval_s=interval_s,
        max_devices=max_devices,
        max_cost_per_hour=max_cost_per_hour,
        split_threshold=split_threshold,
        tuning=tuning or Tuning(),
    )


@dataclass
class TandemPolicy:
    """Tandem's planner as a simulator autoscaling policy (keeps the state and the decisions)."""

    spec: PlannerSpec
    name: str = "tandem"
    state: PlannerState = field(default_factory=PlannerState)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    keep_decisions: bool = True
    _threshold: int | None = None
    _client: tuple[tuple[float, float], ...] | None = None
    _arrivals: PoolObservation | None = None

    def observe_clients(
        self,
        ttft_buckets: tuple[tuple[float, float], ...],
        mean_ttft_s: float | None,
        arrivals: PoolObservation | None = None,
    ) -> None:
        """The router's TTFT histogram and arrivals, as the operator reads them from Prometheus."""
        self._client = ttft_buckets
        self._arrivals = arrivals

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        observation = observation_from_states(pools, self._client, self._arrivals)
        decision = decide(self.spec, observation, self.state, now)
        self.state = decision.state
        self._threshold = decision.split_threshold
        if self.keep_decisions:
            self.decisions.append((now, decision))
        return decision.replicas

    def split_threshold(self) -> int | None:
        return self._threshold
