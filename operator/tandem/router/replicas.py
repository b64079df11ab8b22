"""The router's replica table: per pool and per role, keeping each replica's counters across
endpoint updates (a replica that stays keeps its in-flight counts; one that goes is dropped, and the
requests still running on it finish against the object they hold)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tandem.router.config import ROLES, PoolConfig
from tandem.router.decide import ReplicaState


class ReplicaTable:
    def __init__(self) -> None:
        self.pool_roles: dict[str, str] = {}
        self.pool_speeds: dict[str, float] = {}  # pool -> modelled prefill seconds per token (0: unknown)
        self.by_pool: dict[str, list[ReplicaState]] = {}
        # role -> replicas of every pool with that role; what `decide` reads. Rebuilt on change.
        self.by_role: dict[str, tuple[ReplicaState, ...]] = {role: () for role in ROLES}

    def configure(self, pools: Sequence[PoolConfig]) -> None:
        """Track exactly these pools (a pool whose role changed starts empty)."""
        wanted = {p.name: p.role for p in pools}
        for name in list(self.by_pool):
            if wanted.get(name) != self.pool_roles.get(name):
                del self.by_pool[name]
        self.pool_roles = wanted
        self.pool_speeds = {p.name: p.seconds_per_prompt_token or 0.0 for p in pools}
        for name in wanted:
            for replica in self.by_pool.setdefault(name, []):
                replica.seconds_per_token = self.pool_speeds[name]
        self._rebuild()

    def set_endpoints(self, pool: str, addresses: Iterable[str]) -> bool:
        """Replace a pool's replicas by ``addresses``; returns True if the set changed."""
        role = self.pool_roles.get(pool)
        if role is None:
            return False
        current = {r.address: r for r in self.by_pool.get(pool, [])}
        ordered = list(dict.fromkeys(addresses))
        if ordered == [r.address for r in self.by_pool.get(pool, [])]:
            return False
        self.by_pool[pool] = [
            current.get(a)
            or ReplicaState(
                address=a, role=role, pool=pool, seconds_per_token=self.pool_speeds.get(pool, 0.0)
            )
            for a in ordered
        ]
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        by_role: dict[str, list[ReplicaState]] = {role: [] for role in ROLES}
        for pool, replicas in self.by_pool.items():
            by_role[self.pool_roles[pool]].extend(replicas)
        self.by_role = {role: tuple(replicas) for role, replicas in by_role.items()}

    def count(self) -> int:
        return sum(len(r) for r in self.by_role.values())

    def snapshot(self) -> list[dict[str, object]]:
        """Every replica and its load, for ``/router/state``."""
        return [
            {
                "pool": r.pool,
                "role": r.role,
                "address": r.address,
                "inflight": r.inflight,
                "inflightTokens": r.inflight_tokens,
                "outsideLoad": r.outside,
                "secondsPerPromptToken": r.seconds_per_token or None,
                "failedUntil": r.failed_until,
            }
            for replicas in self.by_pool.values()
            for r in replicas
        ]
