"""The generated CRDs are structural, carry readable rules and match the models (no drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.models import crdgen
from tandem.models.inference_service import Replicas

ROOT = Path(__file__).resolve().parents[1]


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += walk(value, f"{path}[{i}]")
    return out


@pytest.fixture(params=sorted(crdgen.render_all()))
def crd(request: pytest.FixtureRequest) -> dict[str, Any]:
    return yaml.safe_load(crdgen.render_all()[request.param])


def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def test_structural(crd: dict[str, Any]) -> None:
    for path, node in walk(schema(crd)):
        assert "$ref" not in node, path
        assert "$defs" not in node, path
        assert node.get("type") != "null", path
        assert "uniqueItems" not in node, path
        assert not ("additionalProperties" in node and "properties" in node), path
        assert "default" not in node or node["default"] is not None, path
        if "x-kubernetes-int-or-string" not in node and "x-kubernetes-preserve-unknown-fields" not in node:
            if path.endswith(("properties", "x-kubernetes-validations")) or "[" in path.rsplit(".", 1)[-1]:
                continue
            if "properties" in node or "items" in node or "enum" in node:
                assert "type" in node, f"{path} lacks a type"


def test_every_rule_has_a_message(crd: dict[str, Any]) -> None:
    rules = [r for _, n in walk(schema(crd)) for r in n.get("x-kubernetes-validations", [])]
    assert rules
    for r in rules:
        assert r["message"] and r["message"][0].islower(), r


def _undocumented(node: dict[str, Any], path: str) -> list[str]:
    out: list[str] = []
    for key, sub in (node.get("properties") or {}).items():
        if "description" not in sub:
            out.append(f"{path}.{key}")
        out += _undocumented(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _undocumented(node["items"], f"{path}[]")
    return out


def test_every_spec_field_is_documented(crd: dict[str, Any]) -> None:
    """`kubectl explain` shows a field's description: every field a user writes has one."""
    spec = schema(crd)["properties"].get("spec")
    if spec is None or crd["spec"]["group"] != "inference.tandem.dev":
        pytest.skip("not one of Tandem's kinds")
    assert _undocumented(spec, "spec") == []


def test_undocumented_fields_are_found() -> None:
    node = {
        "properties": {
            "a": {"description": "x", "properties": {"b": {}}},
            "c": {"items": {"properties": {"d": {}}}},
        }
    }
    assert _undocumented(node, "spec") == ["spec.a.b", "spec.c", "spec.c[].d"]


def test_exclusive_minimum_is_openapi_v3(crd: dict[str, Any]) -> None:
    for path, node in walk(schema(crd)):
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_printer_columns() -> None:
    isvc = yaml.safe_load(crdgen.render_all()["inference.tandem.dev_inferenceservices.yaml"])
    cols = [c["name"] for c in isvc["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols[:5] == ["Ready", "P:D", "Prefill", "Decode", "Mixed"] and "Age" in cols
    assert isvc["spec"]["names"]["shortNames"] == ["tisvc"]
    wide = {c["name"]: c["jsonPath"] for c in isvc["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert (
        wide["Autoscaling"] == ".spec.autoscaling.mode" and wide["Planner"] == ".status.lastDecision.reason"
    )
    # every plain path names a field of the schema (a typo would show an empty column)
    root = schema(isvc)
    for path in (p for p in wide.values() if "[" not in p and not p.startswith(".metadata")):
        node = root
        for part in path.strip(".").split("."):
            node = node["properties"][part]
    pool = yaml.safe_load(crdgen.render_all()["inference.tandem.dev_acceleratorpools.yaml"])
    assert pool["spec"]["scope"] == "Cluster" and pool["spec"]["names"]["shortNames"] == ["accpool"]


def test_defaults_are_literal_in_the_schema() -> None:
    isvc = schema(yaml.safe_load(crdgen.render_all()["inference.tandem.dev_inferenceservices.yaml"]))
    spec = isvc["properties"]["spec"]["properties"]
    assert spec["engine"]["default"] == "vllm"
    assert (
        spec["slo"]["default"] == {"ttftSeconds": 2.0, "itlSeconds": 0.1, "attainment": 0.9}
        and spec["slo"]["properties"]["attainment"]["default"] == 0.9
    )
    assert spec["kvTransfer"]["properties"]["connector"]["default"] == "nixl"
    assert "default" not in spec["autoscaling"]["properties"]["budget"]  # optional stays absent


def test_no_drift() -> None:
    assert crdgen.main(["--check", "--out", str(ROOT / "crds")]) == 0


def test_api_accelerator_names_match_the_catalog() -> None:
    from tandem.models.accelerator_pool import KNOWN_MODELS
    from tandem.perf.catalog import ACCELERATORS, get_accelerator

    resolved = {get_accelerator(name).name for name in KNOWN_MODELS}
    assert resolved == {a.name for a in ACCELERATORS.values()}


TOLERATIONS = [
    # (toleration, valid): the apiserver's Pod validation as the reference
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
    ({"operator": "Exists"}, True),  # tolerates every taint
    ({"key": "dedicated", "value": "inference"}, True),  # operator defaults to Equal
    (
        {
            "key": "a.b-c/d_e.f",
            "operator": "Equal",
            "value": "x-1",
            "effect": "NoExecute",
            "tolerationSeconds": 60,
        },
        True,
    ),
    ({"key": "gpu vendor!", "operator": "Exists"}, False),
    ({"key": "x/y/z", "operator": "Exists"}, False),
    ({"key": "-leading", "operator": "Exists"}, False),
    ({"key": "example.com/" + "n" * 64, "operator": "Exists"}, False),  # name part over 63
    ({"operator": "Equal", "value": "x"}, False),
    ({"value": "x"}, False),  # no key and (default) Equal
    ({"key": "a", "operator": "Exists", "value": "x"}, False),
    ({"key": "a", "value": "has space"}, False),
    ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}, False),
]


@pytest.mark.parametrize(("toleration", "valid"), TOLERATIONS)
def test_tolerations_are_validated_like_a_pods(toleration: dict[str, Any], valid: bool) -> None:
    from pydantic import ValidationError

    from tandem.models.common import Toleration

    if valid:
        assert Toleration.model_validate(toleration).to_wire() == toleration
    else:
        with pytest.raises(ValidationError):
            Toleration.model_validate(toleration)


def _defaults_in_list_items(node: Any, path: str = "", in_items: bool = False) -> list[str]:
    if isinstance(node, list):
        return [
            p for i, item in enumerate(node) for p in _defaults_in_list_items(item, f"{path}[{i}]", in_items)
        ]
    if not isinstance(node, dict):
        return []
    found = [path] if in_items and "default" in node else []
    for key, value in node.items():
        found += _defaults_in_list_items(value, f"{path}.{key}", in_items or key == "items")
    return found


@pytest.mark.parametrize("name", sorted(crdgen.render_all()))
def test_specs_default_nothing_inside_a_list(name: str) -> None:
    """A default inside a list item makes a client-side re-apply of an unchanged manifest that
    omits the field report "configured" (the live list differs from the manifest's), which GitOps
    tools show as drift (e2e/test_gitops.py); the models' defaults apply instead."""
    crd = yaml.safe_load(crdgen.render_all()[name])
    spec = schema(crd)["properties"].get("spec", {})
    assert _defaults_in_list_items(spec) == []


def test_the_replicas_rule_reads_an_unset_bound_as_the_models_default() -> None:
    """Without schema defaults in the pools list, the CEL rule itself stands in for them."""
    crd = yaml.safe_load(crdgen.render_all()["inference.tandem.dev_inferenceservices.yaml"])
    pool = schema(crd)["properties"]["spec"]["properties"]["pools"]["items"]["properties"]
    (check,) = pool["replicas"]["x-kubernetes-validations"]
    assert check["rule"] == "(has(self.min) ? self.min : 1) <= (has(self.max) ? self.max : 1)"
    assert Replicas().min == Replicas().max == 1


def test_a_property_called_default_or_items_inside_a_list_is_kept() -> None:
    """Dropping defaults inside list items removes the keyword, not a property of that name."""
    schema_ = {
        "type": "object",
        "properties": {
            "entries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "default": {},
                    "properties": {
                        "default": {"type": "boolean", "default": False},
                        "items": {"type": "array", "items": {"type": "string"}},
                        "name": {"type": "string", "default": "x"},
                    },
                },
            },
            "default": {"type": "string", "default": "top"},
        },
    }
    crdgen._no_defaults_in_list_items(schema_)
    item = schema_["properties"]["entries"]["items"]
    assert "default" not in item and set(item["properties"]) == {"default", "items", "name"}
    assert item["properties"]["default"] == {"type": "boolean"}
    assert item["properties"]["name"] == {"type": "string"}
    assert schema_["properties"]["default"] == {"type": "string", "default": "top"}  # not in a list
