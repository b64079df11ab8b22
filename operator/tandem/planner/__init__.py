"""Replica decisions (pure). The Prometheus-driven planner builds on ``base_replicas``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tandem.models.inference_service import InferenceServiceSpec


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def base_replicas(
    spec: InferenceServiceSpec, live: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, int | None]:
    """Replicas per pool before any metrics are read. ``live``: pool name -> live Deployment.

    - ``off``: pinned to ``min``.
    - ``planner``: keeps what the planner last set, clamped into ``min..max`` (``min`` at first).
    - ``external``: ``min`` at creation, then ``None``: the field is left to the HPA/KEDA.
    """
    mode = spec.autoscaling.mode
    result: dict[str, int | None] = {}
    for pool in spec.pools:
        low, high = pool.replicas.min, pool.replicas.max
        dep = live.get(pool.name)
        current = dep.get("spec", {}).get("replicas") if dep else None
        if mode == "off" or current is None:
            result[pool.name] = low
        elif mode == "external":
            result[pool.name] = None
        else:
            result[pool.name] = clamp(int(current), low, high)
    return result
