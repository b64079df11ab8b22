"""Helpers shared by the unit tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.builders import ServiceContext
from tandem.models import InferenceServiceSpec
from tandem.planner import base_replicas
from tandem.resolve import resolve

GOLDEN = Path(__file__).parent / "golden"
UID = "00000000-0000-0000-0000-000000000001"


def make_ctx(spec_doc: dict[str, Any], pools: dict[str, dict], name: str = "llama") -> ServiceContext:
    """A resolved ServiceContext in namespace team-a (the spec must resolve against ``pools``)."""
    spec = InferenceServiceSpec.model_validate(spec_doc)
    resolution = resolve(spec, pools)
    assert resolution.ok, resolution.problems
    return ServiceContext(
        name=name,
        namespace="team-a",
        uid=UID,
        spec=spec,
        accelerator_pools=resolution.accelerator_pools,
        replicas=base_replicas(spec, {}),
    )


def check_golden(name: str, objects: list[dict[str, Any]]) -> None:
    """Compares ``objects`` with tests/golden/<name>.yaml; ``UPDATE_GOLDEN=1`` rewrites the file."""
    path = GOLDEN / f"{name}.yaml"
    text = yaml.safe_dump_all(objects, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path.name} was missing and has been written; re-run")
    assert text == path.read_text(), f"{path.name} differs; run UPDATE_GOLDEN=1 pytest if intended"


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386) applied, as the apiserver applies one: null removes."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def is_sentence(message: str) -> bool:
    """A condition's or an Event's message as the API conventions want it: a human-readable
    sentence (not empty, not starting in lower case, ending in a full stop)."""
    return bool(message) and not message[0].islower() and message.endswith(".")


class EventKube:
    """A Kube that records the Events posted (a POST of an events.k8s.io/v1 Event)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def request(self, method: str, path: str, body: dict | None = None, **_: object) -> dict:
        assert method == "POST" and path.endswith("/events") and body is not None
        self.events.append((body["type"], body["reason"], body["note"]))
        return body
