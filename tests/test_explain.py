"""``tandem explain``'s grouping of a real planner decision (from the simulator): every pool's
and every path's signals land in their tables, and what it does not group is still shown."""

from __future__ import annotations

from typing import Any

from tandem.bench.run import BenchConfig, _run, tandem_fleet, tandem_router
from tandem.bench.traces import shift
from tandem.explain import _known, render
from tandem.planner.policy import TandemPolicy, planner_spec_for_fleet


def planner_decision() -> Any:
    cfg = BenchConfig()
    fleet = tandem_fleet(cfg)
    spec = planner_spec_for_fleet(
        fleet, cfg.slo, interval_s=cfg.sim.autoscale_interval_s, split_threshold=cfg.split_threshold
    )
    policy = TandemPolicy(spec)
    _run(shift(seed=1, duration_s=1500.0), fleet, cfg, policy, "tandem", tandem_router(cfg))
    _, decision = policy.decisions[-1]  # after the switch to long prompts: both paths in play
    return fleet, decision


def service(fleet: Any, decision: Any) -> dict[str, Any]:
    pools = [
        {"name": p.name, "role": p.role, "acceleratorPool": p.accelerator.name, "desiredReplicas": 1,
         "readyReplicas": 1}
        for p in fleet.pools
    ]  # fmt: skip
    return {
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {"autoscaling": {"mode": "planner"}},
        "status": {
            "pools": pools,
            "ratio": "1:1",
            "lastDecision": {"time": "t0", "reason": decision.reason, "message": decision.message,
                             "signals": dict(decision.signals)},
            "conditions": [{"type": "MetricsAvailable", "status": "True", "reason": "MetricsRead"}],
        },
    }  # fmt: skip


def test_explain_groups_every_pool_and_path_signal() -> None:
    fleet, decision = planner_decision()
    text = render(service(fleet, decision), width=200)
    signals = dict(decision.signals)
    assert f"Last decision: {decision.reason} at t0." in text and "MetricsRead" in text
    for pool in fleet.pools:
        row = next(line for line in text.splitlines() if line.startswith(f"│ {pool.name} "))
        for key in ("capacityRps", "bottleneck", "correction"):
            assert signals[f"{pool.name}.{key}"] in row, (pool.name, key, row)
    assert "Demand per path" in text and "Error budget and routing" in text
    for key in ("split.plannedRps", "mixed.plannedRps", "ttftWithinTarget", "splitThreshold"):
        assert key in signals  # the planner still names them as explain expects
    # what explain does not group is listed as it is, so nothing the planner said is hidden
    rest = set(signals) - _known([p.name for p in fleet.pools])
    for key in rest:
        assert f"{key}={signals[key]}" in text


def test_explain_without_a_status_says_so() -> None:
    text = render({"metadata": {"name": "x", "namespace": "ns"}, "spec": {}})
    assert "No status yet" in text and "ns/x" in text
