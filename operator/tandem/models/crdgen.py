"""Generates the CustomResourceDefinitions from the pydantic models (one source of truth).

pydantic emits JSON Schema 2020-12; the apiserver wants a *structural* OpenAPI v3 schema. The
post-processing here inlines ``$ref``, drops ``null`` branches and titles, turns ``const`` into
``enum`` and numeric ``exclusiveMinimum`` into the boolean OpenAPI form, removes
``additionalProperties: false`` (the apiserver prunes unknown fields itself) and
``uniqueItems`` (not allowed), and adds a literal ``default`` for nested objects so that the
apiserver applies nested defaults and ``kubectl get -o yaml`` shows them (the literal default is
the object's own field defaults, since CEL rules on it are evaluated against that literal).

Run ``python -m tandem.models.crdgen --out crds`` to write, ``--check`` to fail on drift. With
several ``--out`` directories, the first is the source of truth: every directory gets the generated
CRDs, and the others also get byte-for-byte copies of the hand-written ``*.yaml`` files of the first
(kopf's peering CRDs); stale ``*.yaml`` files in the copies are removed (``--check`` reports them).
``make crds`` writes ``crds/`` and the Helm chart's ``charts/tandem/crds/`` this way.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tandem import names
from tandem.models import accelerator_pool as ap
from tandem.models import inference_service as isvc
from tandem.models.common import TOLERATION_RULES

Schema = dict[str, Any]

_DROP_KEYS = {"title", "uniqueItems"}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        merged = copy.deepcopy(defs[ref])
        merged.update(node)  # siblings (description, default) win over the definition's
        node = merged
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        inner = dict(inner)
        inner.update(node)
        node = inner
        return _resolve(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            del node["anyOf"]
            inner = dict(branches[0])
            inner.update(node)
            node = inner
            return _resolve(node, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _openapi_keywords(out: Schema) -> None:
    """Rewrites JSON Schema 2020 keywords into their OpenAPI v3 (Kubernetes) forms, in place."""
    if out.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out.pop("type", None)
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[base] = value
            out[bound] = True


def _object_defaults(original: Schema, out: Schema) -> None:
    """A nested object without a default of its own (pydantic's default_factory) gets a literal
    default of its fields' defaults, so the apiserver fills them in; an optional object (pydantic
    default None) stays absent. Spelled out in full: CEL rules on the object are checked against it."""
    for key, prop in out.get("properties", {}).items():
        had_default = "default" in original["properties"][key]
        if prop.get("type") != "object" or "properties" not in prop or had_default or prop.get("required"):
            continue
        # copies: a nested object's default shared with its parent's would be a YAML anchor
        prop["default"] = {
            k: copy.deepcopy(v["default"])
            for k, v in prop["properties"].items()
            if v.get("default") is not None
        }


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP_KEYS or (key == "additionalProperties" and value is False):
            continue
        if key == "properties":
            out[key] = {k: _structural(v) for k, v in value.items()}
        else:
            out[key] = _structural(value)
    _openapi_keywords(out)
    if out.get("type") == "object" and "properties" in out:
        _object_defaults(node, out)
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def schema_of(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))  # type: ignore[no-any-return]


def _no_defaults_in_list_items(node: Any, in_items: bool = False) -> None:
    """Drops every ``default`` under a list's items, in place. A list is replaced whole by a
    client-side apply (a CRD has no strategic merge keys), so a field the apiserver defaults
    inside a list item makes the live list differ from an unchanged manifest that omits it:
    every ``kubectl apply`` of it says "configured", and a GitOps tool comparing desired with
    live shows the service OutOfSync for good. The models' own defaults apply instead."""
    if isinstance(node, list):
        for item in node:
            _no_defaults_in_list_items(item, in_items)
    elif isinstance(node, dict):
        if in_items:
            node.pop("default", None)
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                # property name -> schema: a property may be called "default" or "items"
                for schema in value.values():
                    _no_defaults_in_list_items(schema, in_items)
            else:
                _no_defaults_in_list_items(value, in_items or key == "items")


def _add_rules(node: Schema, path: list[str], rules: list[dict[str, str]]) -> None:
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    node.setdefault("x-kubernetes-validations", []).extend(rules)


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    scope: str,
    spec: Schema,
    status: Schema,
    columns: list[dict[str, Any]],
    root_rules: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    root: Schema = {
        "type": "object",
        "description": f"{kind} ({names.API_VERSION}).",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{names.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "tandem"},
        },
        "spec": {
            "group": names.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["tandem"],
            },
            "scope": scope,
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _ready_column() -> dict[str, Any]:
    return {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _age_column() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def inference_service_crd() -> dict[str, Any]:
    spec = schema_of(isvc.InferenceServiceSpec)
    spec["description"] = "What to serve, on which AcceleratorPools, under which latency targets."
    _no_defaults_in_list_items(spec)
    _add_rules(spec, [], isvc.SPEC_RULES)
    _add_rules(spec, ["model"], isvc.MODEL_RULES)
    _add_rules(spec, ["pools", "[]", "replicas"], isvc.REPLICAS_RULES)
    _add_rules(spec, ["pools", "[]", "tensorParallelSize"], isvc.TP_RULES)
    _add_rules(spec, ["pools", "[]", "maxUnavailable"], isvc.MAX_UNAVAILABLE_RULES)
    status = schema_of(isvc.InferenceServiceStatus)
    columns = [
        _ready_column(),
        {"name": "P:D", "type": "string", "jsonPath": ".status.ratio"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.replicas.prefill"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.replicas.decode"},
        {"name": "Mixed", "type": "string", "jsonPath": ".status.replicas.mixed"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        # kubectl get -o wide: who sets the replicas, and what the planner wants or would set
        {"name": "Autoscaling", "type": "string", "jsonPath": ".spec.autoscaling.mode", "priority": 1},
        {"name": "Target P:D", "type": "string", "jsonPath": ".status.targetRatio", "priority": 1},
        {"name": "Planner", "type": "string", "jsonPath": ".status.lastDecision.reason", "priority": 1},
        {
            "name": "Reason",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
            "priority": 1,
        },
        _age_column(),
    ]
    return _crd(
        kind=names.KIND_SERVICE,
        plural=names.PLURAL_SERVICE,
        short="tisvc",
        scope="Namespaced",
        spec=spec,
        status=status,
        columns=columns,
        root_rules=isvc.ROOT_RULES,
    )


def accelerator_pool_crd() -> dict[str, Any]:
    spec = schema_of(ap.AcceleratorPoolSpec)
    spec["description"] = "A vendor-labelled pool of accelerator nodes that InferenceServices may use."
    _no_defaults_in_list_items(spec)
    _add_rules(spec, [], ap.SPEC_RULES)
    _add_rules(spec, ["tolerations", "[]"], TOLERATION_RULES)
    status = schema_of(ap.AcceleratorPoolStatus)
    columns = [
        {"name": "Vendor", "type": "string", "jsonPath": ".spec.vendor"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.matchingNodes"},
        {"name": "Devices", "type": "integer", "jsonPath": ".status.allocatableDevices"},
        {"name": "Allocated", "type": "integer", "jsonPath": ".status.allocatedDevices"},
        _ready_column(),
        _age_column(),
    ]
    return _crd(
        kind=names.KIND_POOL,
        plural=names.PLURAL_POOL,
        short="accpool",
        scope="Cluster",
        spec=spec,
        status=status,
        columns=columns,
    )


def render_all() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    out = {}
    for crd in (accelerator_pool_crd(), inference_service_crd()):
        name = f"{crd['metadata']['name']}.yaml".replace(f".{names.GROUP}", "")
        text = "# Generated by `make crds` from operator/tandem/models; do not edit.\n"
        text += yaml.safe_dump(crd, sort_keys=False, width=120)
        out[f"{names.GROUP}_{name}"] = text
    return out


def planned_files(out_dirs: list[Path]) -> dict[Path, dict[str, str]]:
    """Directory -> file name -> text it must hold: the generated CRDs everywhere, plus, in every
    directory after the first, the first directory's hand-written ``*.yaml`` files."""
    rendered = render_all()
    source = out_dirs[0]
    hand_written = (
        {p.name: p.read_text() for p in sorted(source.glob("*.yaml")) if p.name not in rendered}
        if source.is_dir()
        else {}
    )
    plan: dict[Path, dict[str, str]] = {}
    for i, d in enumerate(out_dirs):
        plan[d] = dict(rendered) if i == 0 else {**rendered, **hand_written}
    return plan


def _diff(path: Path, current: str, text: str) -> None:
    sys.stderr.writelines(
        difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(path), "generated")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        action="append",
        required=True,
        help="directory to write (repeatable; the first one's hand-written files are copied to the others)",
    )
    parser.add_argument("--check", action="store_true", help="fail if the files differ instead of writing")
    args = parser.parse_args(argv)
    out_dirs = [Path(d) for d in args.out]
    drift = False
    for i, (d, files) in enumerate(planned_files(out_dirs).items()):
        for fname, text in files.items():
            path = d / fname
            current = path.read_text() if path.exists() else ""
            if current == text:
                continue
            if args.check:
                drift = True
                _diff(path, current, text)
            else:
                d.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"Wrote {path}")
        if i == 0 or not d.is_dir():
            continue  # the source directory may hold hand-written files; copies hold nothing else
        for stale in sorted(p for p in d.glob("*.yaml") if p.name not in files):
            if args.check:
                drift = True
                print(f"{stale}: not generated and not in {out_dirs[0]}", file=sys.stderr)
            else:
                stale.unlink()
                print(f"Removed {stale}")
    if drift:
        print("CRDs are out of date: run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
