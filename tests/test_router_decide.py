"""The router's pure decision: path and replicas from a snapshot of loads (scenario tables)."""

from __future__ import annotations

import pytest

from tandem.router.decide import (
    Decision,
    Policy,
    Reason,
    ReplicaState,
    RoutePath,
    decide,
    pick_replica,
    pick_single,
)

NOW = 1000.0


def replica(
    name: str, role: str, inflight: int = 0, tokens: int = 0, last: int = 0, failed: float = 0.0
) -> ReplicaState:
    return ReplicaState(
        address=name,
        role=role,
        inflight=inflight,
        inflight_tokens=tokens,
        last_pick=last,
        failed_until=failed,
    )


def pools(**by_role: list[ReplicaState]) -> dict[str, list[ReplicaState]]:
    return {role: by_role.get(role, []) for role in ("prefill", "decode", "mixed")}


def full() -> dict[str, list[ReplicaState]]:
    return pools(
        prefill=[replica("p1:1", "prefill")],
        decode=[replica("d1:1", "decode")],
        mixed=[replica("m1:1", "mixed")],
    )


POLICY = Policy(split_threshold_tokens=1024, prefill_inflight_limit=2, mixed_inflight_limit=3)


def summary(d: Decision | None) -> tuple[str, str, str | None, str] | None:
    if d is None:
        return None
    return (d.path, d.target.address, d.prefill.address if d.prefill else None, d.reason)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (0, ("mixed", "m1:1", None, Reason.BELOW_THRESHOLD)),
        (1023, ("mixed", "m1:1", None, Reason.BELOW_THRESHOLD)),
        (1024, ("split", "d1:1", "p1:1", Reason.ABOVE_THRESHOLD)),
        (100_000, ("split", "d1:1", "p1:1", Reason.ABOVE_THRESHOLD)),
    ],
)
def test_threshold_chooses_the_path(tokens: int, expected: tuple[str, str, str | None, str]) -> None:
    assert summary(decide(tokens, full(), POLICY, NOW)) == expected


def test_modes_never_and_always() -> None:
    never = Policy(disaggregation="never", split_threshold_tokens=0)
    assert summary(decide(50_000, full(), never, NOW)) == ("mixed", "m1:1", None, Reason.NEVER)
    always = Policy(disaggregation="always", split_threshold_tokens=10_000)
    assert summary(decide(1, full(), always, NOW)) == ("split", "d1:1", "p1:1", Reason.ALWAYS)


def test_saturated_prefill_pool_overflows_to_a_free_mixed_replica() -> None:
    p = full()
    p["prefill"][0].inflight = 2  # at the limit
    assert summary(decide(5000, p, POLICY, NOW)) == ("mixed", "m1:1", None, Reason.PREFILL_SATURATED)
    p["mixed"][0].inflight = 3  # the mixed replica is full too: split anyway (queue at prefill)
    assert summary(decide(5000, p, POLICY, NOW)) == ("split", "d1:1", "p1:1", Reason.ABOVE_THRESHOLD)


def test_saturation_needs_every_prefill_replica_busy() -> None:
    p = full()
    p["prefill"] = [replica("p1:1", "prefill", inflight=2), replica("p2:1", "prefill", inflight=1)]
    assert summary(decide(5000, p, POLICY, NOW)) == ("split", "d1:1", "p2:1", Reason.ABOVE_THRESHOLD)


def test_all_prefill_replicas_failed_recently_counts_as_saturated() -> None:
    p = full()
    p["prefill"][0].failed_until = NOW + 1
    assert summary(decide(5000, p, POLICY, NOW)) == ("mixed", "m1:1", None, Reason.PREFILL_SATURATED)
    # after the cooldown it is used again
    assert summary(decide(5000, p, POLICY, NOW + 2)) == ("split", "d1:1", "p1:1", Reason.ABOVE_THRESHOLD)


def test_missing_pools() -> None:
    # no mixed pool: short requests run whole on a decode replica, long ones split
    no_mixed = pools(prefill=[replica("p:1", "prefill")], decode=[replica("d:1", "decode")])
    assert summary(decide(10, no_mixed, POLICY, NOW)) == ("mixed", "d:1", None, Reason.BELOW_THRESHOLD)
    assert summary(decide(5000, no_mixed, POLICY, NOW))[0] == "split"  # type: ignore[index]
    # no prefill pool: everything on one replica
    no_prefill = pools(decode=[replica("d:1", "decode")], mixed=[replica("m:1", "mixed")])
    assert summary(decide(5000, no_prefill, POLICY, NOW)) == ("mixed", "m:1", None, Reason.NO_SPLIT_POOLS)
    only_prefill = pools(prefill=[replica("p:1", "prefill")])
    assert summary(decide(5000, only_prefill, POLICY, NOW)) == ("mixed", "p:1", None, Reason.NO_SPLIT_POOLS)
    assert decide(5000, pools(), POLICY, NOW) is None


def test_least_outstanding_work_wins() -> None:
    a = replica("a", "decode", inflight=2, tokens=10)
    b = replica("b", "decode", inflight=1, tokens=5000)
    c = replica("c", "decode", inflight=1, tokens=100)
    assert pick_replica([a, b, c], NOW) is c  # fewest requests, then fewest tokens
    d = replica("d", "decode", inflight=1, tokens=100, last=7)
    e = replica("e", "decode", inflight=1, tokens=100, last=3)
    assert pick_replica([d, e], NOW) is e  # tie: the one picked longest ago (round-robin)


def test_failed_replicas_are_skipped_unless_nothing_else_is_left() -> None:
    bad = replica("bad", "mixed", failed=NOW + 5)
    good = replica("good", "mixed", inflight=10)
    assert pick_replica([bad, good], NOW) is good
    assert pick_replica([bad], NOW) is bad
    assert pick_replica([bad, good], NOW, exclude=[good]) is bad
    assert pick_replica([bad], NOW, exclude=[bad]) is None


def test_pick_single_prefers_mixed_then_decode_then_prefill() -> None:
    p = full()
    assert pick_single(p, NOW).address == "m1:1"  # type: ignore[union-attr]
    assert pick_single(p, NOW, exclude=p["mixed"]).address == "d1:1"  # type: ignore[union-attr]
    gone = [*p["mixed"], *p["decode"]]
    assert pick_single(p, NOW, exclude=gone).address == "p1:1"  # type: ignore[union-attr]


def test_decide_is_pure() -> None:
    p = full()
    before = [(r.inflight, r.inflight_tokens, r.last_pick) for rs in p.values() for r in rs]
    assert decide(5000, p, POLICY, NOW) == decide(5000, p, POLICY, NOW)
    assert [(r.inflight, r.inflight_tokens, r.last_pick) for rs in p.values() for r in rs] == before
    assert RoutePath.SPLIT == "split" and RoutePath.MIXED == "mixed"


def test_a_prompt_goes_to_the_prefill_replica_that_would_finish_it_first() -> None:
    """With every prefill replica's modelled speed known, the pick is by (queued tokens + the
    prompt) x seconds per token: a part 2.5x faster takes the prompt until its queue is 1.5x
    the prompt; the request counts still decide saturation."""
    fast = ReplicaState("fast:1", "prefill", inflight=1, inflight_tokens=4000, seconds_per_token=1e-5)
    slow = ReplicaState("slow:1", "prefill", seconds_per_token=2.5e-5)
    ps = pools(prefill=[fast, slow], decode=[replica("d:1", "decode")])
    policy = Policy(split_threshold_tokens=512)
    d = decide(4000, ps, policy, NOW)
    assert d is not None and d.prefill is fast  # (4000 + 4000) x 1e-5 < 4000 x 2.5e-5
    fast.inflight_tokens = 8000
    d = decide(4000, ps, policy, NOW)
    assert d is not None and d.prefill is slow  # (8000 + 4000) x 1e-5 > 4000 x 2.5e-5
    # the engine's own queue counts at the mean size of the router's in-flight requests
    fast.inflight_tokens, fast.outside = 2000, 2
    assert pick_replica(ps["prefill"], NOW, prompt_tokens=4000) is slow  # (2000 + 4000 + 4000) x 1e-5
    # without a prompt, or with a speed unknown, the request counts decide as before
    fast.outside = 0
    assert pick_replica(ps["prefill"], NOW) is slow
    slow.seconds_per_token = 0.0
    assert pick_replica(ps["prefill"], NOW, prompt_tokens=100) is slow
    # a recently failed replica is still the last resort
    slow.seconds_per_token, slow.failed_until = 2.5e-5, NOW + 5
    assert pick_replica(ps["prefill"], NOW, prompt_tokens=100_000) is fast
