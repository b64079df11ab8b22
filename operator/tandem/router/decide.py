"""The router's per-request choice, as pure functions over a snapshot of replica loads.

No I/O and no clock: the caller passes the replicas (with the router's own in-flight counts) and
``now`` (monotonic seconds). The same inputs always give the same decision.

The policy (issue 8; DistServe and Splitwise for why): disaggregation helps long prompts and hurts
short ones, so a request goes

* to one replica ("mixed" path) when ``disaggregation`` is ``never``, when there is no prefill or no
  decode replica, when the prompt is below the split threshold, or when the prefill pool is
  saturated (every prefill replica has ``prefill_inflight_limit`` requests in flight, or all of
  them failed recently) while a mixed replica has room (fewer than ``mixed_inflight_limit``);
* otherwise through the two-step prefill -> decode protocol ("split" path). ``always`` splits
  whenever a prefill and a decode replica exist.

The one replica of the mixed path comes from the mixed pool, else the decode pool (a decode worker
serves whole requests too, and avoids the KV transfer), else the prefill pool.

Replicas are picked by least outstanding work: fewest requests in flight (the router's own plus
those the engine reports beyond them, `tandem.router.load`), then fewest tokens in flight, then the
one picked longest ago (round-robin among idle replicas). A prompt's prefill replica, when every
prefill replica knows its modelled seconds per prompt token (the operator writes them), is the one
that would finish it first: (tokens queued on it + the prompt) x its seconds per token. Among pools
of different parts a 2.5x faster one takes a prompt until its queue is 1.5x the prompt; within one
part it is the replica with the fewest queued tokens. The simulator's router (`tandem.sim.fleet`)
picks the same way; the saturation test still reads the request counts. A replica that failed
recently (``failed_until > now``) is skipped unless every replica of the pool failed recently.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class RoutePath(StrEnum):
    SPLIT = "split"
    MIXED = "mixed"


class Reason(StrEnum):
    BELOW_THRESHOLD = "below-threshold"
    ABOVE_THRESHOLD = "above-threshold"
    PREFILL_SATURATED = "prefill-saturated"
    NEVER = "never"
    ALWAYS = "always"
    NO_SPLIT_POOLS = "no-split-pools"


@dataclass(slots=True, eq=False)
class ReplicaState:
    """One upstream replica and the router's view of its load (mutated by the router, read here)."""

    address: str  # "host:port"
    role: str
    pool: str = ""
    inflight: int = 0  # requests the router has outstanding on it
    inflight_tokens: int = 0  # their prompt (+ output) tokens
    last_pick: int = 0  # sequence number of the last time it was picked; 0 = never
    failed_until: float = 0.0  # monotonic seconds; skipped until then
    outside: int = 0  # requests the engine reports beyond the router's own (tandem.router.load)
    outside_at: float = 0.0  # monotonic seconds of that reading
    seconds_per_token: float = 0.0  # modelled prefill time per prompt token; 0 = unknown


@dataclass(frozen=True, slots=True)
class Policy:
    disaggregation: str = "auto"  # auto | always | never
    split_threshold_tokens: int = 1024
    prefill_inflight_limit: int = 4
    mixed_inflight_limit: int = 16


@dataclass(frozen=True, slots=True)
class Decision:
    path: RoutePath
    reason: Reason
    target: ReplicaState  # the decode replica (split) or the one replica (mixed)
    prefill: ReplicaState | None = None  # set on the split path


Pools = Mapping[str, Sequence[ReplicaState]]  # role -> replicas
_EMPTY: tuple[ReplicaState, ...] = ()


def _finish_seconds(replica: ReplicaState, prompt_tokens: int) -> float:
    """Modelled seconds until ``replica`` would have prefilled a new prompt: its queued tokens
    (the router's own, plus the engine's extra requests at their mean size, or the prompt's
    when none is known) and the prompt, at its seconds per token."""
    per_request = replica.inflight_tokens / replica.inflight if replica.inflight else prompt_tokens
    queued = replica.inflight_tokens + replica.outside * per_request
    return (queued + prompt_tokens) * replica.seconds_per_token


def pick_replica(
    replicas: Sequence[ReplicaState],
    now: float,
    exclude: Collection[ReplicaState] = (),
    prompt_tokens: int | None = None,
) -> ReplicaState | None:
    """The least loaded replica not in ``exclude``; healthy ones first, then any; None if none.
    With ``prompt_tokens`` and every candidate's seconds per token known: the one that would
    finish the prompt first."""
    timed = prompt_tokens is not None and all(r.seconds_per_token > 0 for r in replicas if r not in exclude)
    best: ReplicaState | None = None
    best_key: tuple[float, int, int, int] | None = None
    fallback: ReplicaState | None = None
    fallback_key: tuple[float, int, int, int] | None = None
    for replica in replicas:
        if replica in exclude:
            continue
        key = (
            _finish_seconds(replica, prompt_tokens) if timed and prompt_tokens else 0.0,
            replica.inflight + replica.outside,
            replica.inflight_tokens,
            replica.last_pick,
        )
        if replica.failed_until > now:
            if fallback_key is None or key < fallback_key:
                fallback, fallback_key = replica, key
        elif best_key is None or key < best_key:
            best, best_key = replica, key
    return best if best is not None else fallback


def pick_single(pools: Pools, now: float, exclude: Collection[ReplicaState] = ()) -> ReplicaState | None:
    """A replica to serve a whole request: mixed pool first, then decode, then prefill."""
    for role in ("mixed", "decode", "prefill"):
        replica = pick_replica(pools.get(role, _EMPTY), now, exclude)
        if replica is not None:
            return replica
    return None


def prefill_saturated(least_loaded: ReplicaState, limit: int, now: float) -> bool:
    """The least loaded prefill replica (so every one) has ``limit`` requests in flight, or every
    prefill replica failed recently."""
    return least_loaded.inflight + least_loaded.outside >= limit or least_loaded.failed_until > now


def decide(prompt_tokens: int, pools: Pools, policy: Policy, now: float) -> Decision | None:
    """The path and replicas for a request of ``prompt_tokens``; None when no replica exists."""
    prefill = pick_replica(pools.get("prefill", _EMPTY), now)
    decode = pick_replica(pools.get("decode", _EMPTY), now)
    if prefill is None or decode is None or policy.disaggregation == "never":
        single = pick_single(pools, now)
        if single is None:
            return None
        reason = Reason.NEVER if policy.disaggregation == "never" else Reason.NO_SPLIT_POOLS
        return Decision(RoutePath.MIXED, reason, single)
    if policy.disaggregation == "always":
        first = pick_replica(pools.get("prefill", _EMPTY), now, prompt_tokens=prompt_tokens)
        return Decision(RoutePath.SPLIT, Reason.ALWAYS, decode, first)
    if prompt_tokens < policy.split_threshold_tokens:
        single = pick_single(pools, now)
        assert single is not None  # a decode replica exists
        return Decision(RoutePath.MIXED, Reason.BELOW_THRESHOLD, single)
    if prefill_saturated(prefill, policy.prefill_inflight_limit, now):
        mixed = pick_replica(pools.get("mixed", _EMPTY), now)
        if mixed is not None and mixed.inflight + mixed.outside < policy.mixed_inflight_limit:
            return Decision(RoutePath.MIXED, Reason.PREFILL_SATURATED, mixed)
    first = pick_replica(pools.get("prefill", _EMPTY), now, prompt_tokens=prompt_tokens)
    return Decision(RoutePath.SPLIT, Reason.ABOVE_THRESHOLD, decode, first)
