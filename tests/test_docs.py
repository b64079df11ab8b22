"""The YAML in README.md and docs/*.md is what a newcomer copies: every block must be an object
(or a `spec:` fragment of one) that the models accept, so a renamed field or a tightened pydantic
constraint fails here instead of at the reader's `kubectl apply`. The CRDs' CEL rules (e.g.
tensorParallelSize a power of two) are not evaluated here: e2e/test_admission.py runs them on the
real apiserver."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem.models.accelerator_pool import AcceleratorPool
from tandem.models.inference_service import InferenceService

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLE = ROOT / "e2e" / "samples" / "inferenceservice.yaml"
BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def yaml_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def _blocks() -> list[tuple[str, int, str]]:
    return [
        (doc.relative_to(ROOT).as_posix(), i, block)
        for doc in DOCS
        for i, block in enumerate(yaml_blocks(doc.read_text()))
    ]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def check(block: str) -> None:
    """Validate one block: a whole AcceleratorPool or InferenceService, or a `spec:` fragment,
    which is merged into the sample InferenceService (e2e/samples/inferenceservice.yaml)."""
    obj = yaml.safe_load(block)
    if not isinstance(obj, dict):
        raise AssertionError(f"not a YAML mapping: {block!r}")
    kind = obj.get("kind")
    if kind == "AcceleratorPool":
        AcceleratorPool.model_validate({k: v for k, v in obj.items() if k != "metadata"})
    elif kind == "InferenceService":
        InferenceService.model_validate({k: v for k, v in obj.items() if k != "metadata"})
    elif set(obj) == {"spec"}:
        sample = yaml.safe_load(SAMPLE.read_text())
        InferenceService.model_validate(_merge({"spec": sample["spec"]}, obj))
    else:
        raise AssertionError(f"neither an object nor a spec fragment: {sorted(obj)}")


def test_docs_have_yaml_blocks() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize(("doc", "index", "block"), _blocks(), ids=lambda v: str(v)[:30])
def test_yaml_block_is_valid(doc: str, index: int, block: str) -> None:
    check(block)


def test_check_rejects_a_misspelt_field() -> None:
    with pytest.raises(ValidationError):
        check("spec:\n  autoscaling: {mode: planner, intervalSecond: 30}\n")
    with pytest.raises(ValidationError):
        check("spec:\n  autoscaling: {mode: sometimes}\n")


def test_blocks_are_found() -> None:
    text = "x\n```yaml\na: 1\n```\n```bash\nb\n```\n```yaml\nc: 2\n```\n"
    assert yaml_blocks(text) == ["a: 1\n", "c: 2\n"]
