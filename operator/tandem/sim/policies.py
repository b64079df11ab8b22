"""Policies the fleet simulator consults: request routing and autoscaling.

The autoscaling hook is a protocol so that the planner's policies (colocated-hpa, static,
dynamo-sla, saturation, oracle, Tandem's own) run in the simulator and in the operator
behind one interface: every interval the caller hands :meth:`AutoscalePolicy.decide` one
:class:`PoolState` per pool, which carries a :class:`PoolObservation` of the shape the
operator reads from Prometheus (``None`` where there is no data), and receives the desired
replicas per pool (``None`` = keep). Policies are pure: time comes in as data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

# The observation shape is the planner's (tandem.planner.types), shared with the operator.
from tandem.planner.types import PoolObservation

Role = Literal["prefill", "decode", "mixed"]

__all__ = [
    "AutoscalePolicy",
    "PoolObservation",
    "PoolState",
    "QueuePolicy",
    "Role",
    "RouterPolicy",
    "StaticPolicy",
    "TunesRouting",
    "make_policy",
]


@dataclass(frozen=True)
class PoolState:
    """One pool as the autoscaler sees it: spec facts, replica counts and the observation."""

    name: str
    role: Role
    accelerator: str
    tp: int
    price_per_hour: float  # per replica (all its devices)
    replicas: int  # desired replicas currently in force (ready + starting)
    ready: int
    starting: int
    min_replicas: int
    max_replicas: int
    observation: PoolObservation


class AutoscalePolicy(Protocol):
    """Decides desired replicas per pool; ``None`` (or a missing key) keeps the current count."""

    name: str

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]: ...


@runtime_checkable
class TunesRouting(Protocol):
    """An autoscaling policy that also moves the router's split threshold at run time.

    The simulator reads :meth:`split_threshold` after every :meth:`AutoscalePolicy.decide`
    and applies it to routing from then on (``None`` = keep).
    """

    def split_threshold(self) -> int | None: ...


@runtime_checkable
class ObservesClients(Protocol):
    """An autoscaling policy that also reads the first tokens as clients see them (Tandem's
    router exports a TTFT histogram; Dynamo's planner reads its frontend's TTFT).

    The simulator calls :meth:`observe_clients` before every :meth:`AutoscalePolicy.decide`
    with the interval's client TTFTs: cumulative first tokens/s per vLLM TTFT bucket bound
    (the last bound infinite) and their mean (None when none came). A pool's own
    ``ttft_buckets`` and ``mean_ttft_s`` are its engine's, as vLLM reports them: a prefill
    instance's first token comes at the end of its prefill, before the KV hand-off.
    ``arrivals``: the requests the router saw arrive in the interval (``requests_per_s``,
    ``mean_prompt_tokens``, ``prompt_tokens_buckets``), where a pool's own counts are of the
    requests that finished there, as vLLM's are.
    """

    def observe_clients(
        self,
        ttft_buckets: tuple[tuple[float, float], ...],
        mean_ttft_s: float | None,
        arrivals: PoolObservation | None = None,
    ) -> None: ...


@dataclass
class StaticPolicy:
    """Never changes anything (the fleet as provisioned)."""

    name: str = "static"

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        return {}


@dataclass
class QueuePolicy:
    """A simple reactive policy on queue length and KV usage, one step per interval.

    Up by one when waiting requests per ready replica exceed ``up_waiting`` or KV usage
    exceeds ``up_kv``, unless a replica is still starting (no cascade during start-up).
    Down by one after ``quiet_intervals`` consecutive intervals with nothing waiting and
    KV usage below ``down_kv``. Clamped to the pool's [min, max]. No data -> no opinion.
    """

    up_waiting: float = 2.0
    up_kv: float = 0.85
    down_kv: float = 0.3
    quiet_intervals: int = 6
    name: str = "queue"
    _quiet: dict[str, int] = field(default_factory=dict)

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        out: dict[str, int | None] = {}
        for name, pool in pools.items():
            obs = pool.observation
            if obs.waiting is None or pool.starting > 0:
                out[name] = None
                continue
            kv = obs.kv_usage or 0.0
            target: int | None = None
            if obs.waiting / max(1, pool.ready) > self.up_waiting or kv > self.up_kv:
                target = pool.replicas + 1
                self._quiet[name] = 0
            elif obs.waiting == 0 and kv < self.down_kv:
                self._quiet[name] = self._quiet.get(name, 0) + 1
                if self._quiet[name] >= self.quiet_intervals:
                    target = pool.replicas - 1
                    self._quiet[name] = 0
            else:
                self._quiet[name] = 0
            if target is not None:
                target = max(pool.min_replicas, min(pool.max_replicas, target))
            out[name] = None if target == pool.replicas else target
        return out


@dataclass(frozen=True)
class RouterPolicy:
    """Per-request choice between co-located (mixed) and split (prefill -> decode) serving.

    When both paths exist, a prompt of at least ``split_threshold_tokens`` goes split,
    unless every prefill instance already queues more than ``max_prefill_queue_tokens``
    (then it prefills on a mixed instance, like Dynamo's conditional disaggregation), or
    every prefill instance holds ``prefill_inflight_limit`` requests while a mixed instance
    holds fewer than ``mixed_inflight_limit`` (Tandem's router, `tandem.router.decide`, with
    the router config's ``limits.prefillInflightPerReplica`` / ``mixedInflightPerReplica``).
    With only one kind of pool the request takes the path that exists.
    """

    split_threshold_tokens: int = 1024
    max_prefill_queue_tokens: int | None = None
    prefill_inflight_limit: int | None = None
    mixed_inflight_limit: int = 16


def make_policy(name: str) -> AutoscalePolicy:
    """Build a shipped policy by name (``static`` or ``queue``)."""
    if name == "static":
        return StaticPolicy()
    if name == "queue":
        return QueuePolicy()
    raise KeyError(f"unknown autoscaling policy {name!r}; known: queue, static")
