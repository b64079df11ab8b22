"""Checks an InferenceService against the objects it references (pure).

What the CRD schema cannot check because it needs other objects (an AcceleratorPool that does
not exist, a tensor-parallel size larger than the pool's nodes) ends up here, as problems that
become a ``Ready=False`` condition and an Event, never an exception loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, for conditions and Events
    message: str  # a clause for a person, lower case and without a full stop ("pool 'x' ...")

    @property
    def sentence(self) -> str:
        """The message as a sentence, for a condition or an Event: capitalised, with a full stop."""
        return sentence(self.message)


def sentence(text: str) -> str:
    """``text`` capitalised and ending in a full stop (kept if it ends in one already)."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


@dataclass(frozen=True)
class Resolution:
    accelerator_pools: dict[str, AcceleratorPoolSpec] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def known_presets() -> set[str]:
    from tandem.perf.models import MODEL_PRESETS

    return set(MODEL_PRESETS)


def parse_pool_spec(raw: Mapping[str, Any]) -> AcceleratorPoolSpec | str:
    """An AcceleratorPool spec, or the reason it cannot be read."""
    try:
        return AcceleratorPoolSpec.model_validate(dict(raw))
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def resolve(spec: InferenceServiceSpec, pools: Mapping[str, Mapping[str, Any]]) -> Resolution:
    """Match each pool of ``spec`` with its AcceleratorPool (``pools``: name -> raw spec)."""
    resolved: dict[str, AcceleratorPoolSpec] = {}
    problems: list[Problem] = []
    if spec.model.preset is not None and spec.model.preset not in known_presets():
        problems.append(
            Problem(
                "UnknownModelPreset",
                f"model preset {spec.model.preset!r} is not known; use one of "
                f"{', '.join(sorted(known_presets()))} or give an architecture",
            )
        )
    for pool in spec.pools:
        raw = pools.get(pool.accelerator_pool)
        if raw is None:
            problems.append(
                Problem(
                    "AcceleratorPoolNotFound",
                    f"pool {pool.name!r} references AcceleratorPool {pool.accelerator_pool!r}, "
                    "which does not exist",
                )
            )
            continue
        accel = parse_pool_spec(raw)
        if isinstance(accel, str):
            problems.append(
                Problem(
                    "InvalidAcceleratorPool", f"AcceleratorPool {pool.accelerator_pool!r} is invalid: {accel}"
                )
            )
            continue
        if pool.tensor_parallel_size > accel.devices_per_node:
            problems.append(
                Problem(
                    "TensorParallelTooLarge",
                    f"pool {pool.name!r} asks for tensorParallelSize {pool.tensor_parallel_size} but "
                    f"AcceleratorPool {pool.accelerator_pool!r} has {accel.devices_per_node} "
                    "devices per node",
                )
            )
            continue
        resolved[pool.name] = accel
    return Resolution(accelerator_pools=resolved, problems=problems)
