"""Replica decisions (pure).

``base_replicas``: replicas before any metrics are read (the controller's floor).
``decide``: Tandem's metrics-driven planner (:mod:`tandem.planner.core`); its inputs and
outputs are in :mod:`tandem.planner.types`. Baseline policies for the simulator live in
:mod:`tandem.planner.baselines` and the simulator adapter in :mod:`tandem.planner.policy`
(not imported here: they depend on :mod:`tandem.sim`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tandem.models.inference_service import InferenceServiceSpec
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
    planner_spec,
)

__all__ = [
    "Decision",
    "Observation",
    "PlannerSpec",
    "PlannerState",
    "PoolObservation",
    "PoolReading",
    "PoolTarget",
    "Tuning",
    "base_replicas",
    "clamp",
    "decide",
    "planner_spec",
]


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def base_replicas(
    spec: InferenceServiceSpec,
    live: Mapping[str, Mapping[str, Any] | None],
    planned: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """Replicas per pool. ``live``: pool name -> live Deployment; ``planned``: pool name ->
    replicas the planner decided (``tandem.scaling.Autoscale.replicas``).

    - ``off``: pinned to ``min``.
    - ``planner``: the planner's decision, else what runs; clamped into ``min..max`` (``min`` at first).
    - ``external``, ``recommend``: ``min`` at creation, then ``None``: the field is left to
      the HPA/KEDA (``recommend`` only reports what the planner would set).
    """
    mode = spec.autoscaling.mode
    result: dict[str, int | None] = {}
    for pool in spec.pools:
        low, high = pool.replicas.min, pool.replicas.max
        dep = live.get(pool.name)
        current = dep.get("spec", {}).get("replicas") if dep else None
        if mode == "planner" and planned and pool.name in planned:
            result[pool.name] = clamp(int(planned[pool.name]), low, high)
        elif mode == "off" or current is None:
            result[pool.name] = low
        elif mode in ("external", "recommend"):
            result[pool.name] = None
        else:
            result[pool.name] = clamp(int(current), low, high)
    return result
