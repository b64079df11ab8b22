"""Whether the cluster's CRDs are as new as this operator (pure: the controller reads them).

Helm installs the CRDs in a chart's ``crds/`` directory but never upgrades them, and the
apiserver drops, without a word, every field its CRD's schema does not know. After an upgrade
of the operator alone, a manifest's new field (``spec.pools[].maxUnavailable``, say) is gone
from the stored object before the operator sees it, and so are the status fields the operator
writes. The controller compares the installed CRDs with the ones this operator was built with
(`tandem.models.crdgen`, the single source of the schemas) and reports the fields the cluster's
lack: a log line naming them and the command that fixes it, and the gauge
``tandem_crd_missing_fields`` (alert ``TandemCrdOutdated``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import yaml

from tandem.models import crdgen


def field_paths(schema: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Every field a structural schema declares, as dotted paths (``spec.pools[].name``; ``[]``
    for a list's items, ``{}`` for a map's values). A subtree that keeps unknown fields
    (``x-kubernetes-preserve-unknown-fields``) declares only itself (`open_paths`)."""
    out: set[str] = set()
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        out.add(path)
        if isinstance(sub, Mapping):
            out |= field_paths(sub, path)
    items = schema.get("items")
    if isinstance(items, Mapping):
        out |= field_paths(items, f"{prefix}[]")
    values = schema.get("additionalProperties")
    if isinstance(values, Mapping):
        out |= field_paths(values, f"{prefix}{{}}")
    return out


def open_paths(schema: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The paths (as `field_paths` names them; "" for the root) whose subtree keeps unknown
    fields: the apiserver prunes nothing under them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return {prefix}
    out: set[str] = set()
    for name, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, Mapping):
            out |= open_paths(sub, f"{prefix}.{name}" if prefix else name)
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        sub = schema.get(key)
        if isinstance(sub, Mapping):
            out |= open_paths(sub, f"{prefix}{suffix}")
    return out


def _kept(path: str, open_: set[str]) -> bool:
    """Whether ``path`` lies under a subtree that keeps unknown fields."""
    return "" in open_ or any(path == o or path.startswith((f"{o}.", f"{o}[", f"{o}{{")) for o in open_)


def missing_fields(installed: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The fields of ``expected`` (a CRD as this operator generates it) that ``installed`` (the
    cluster's) lacks, per served version: ``v1alpha1: spec.pools[].maxUnavailable``; a version
    the cluster does not serve at all counts as ``v1alpha1: (not served)``. Sorted."""
    have = {v.get("name"): v for v in (installed.get("spec") or {}).get("versions") or []}
    out: list[str] = []
    for version in (expected.get("spec") or {}).get("versions") or []:
        if not version.get("served"):
            continue
        name = version["name"]
        theirs = have.get(name)
        if theirs is None or not theirs.get("served"):
            out.append(f"{name}: (not served)")
            continue
        want = field_paths(((version.get("schema") or {}).get("openAPIV3Schema")) or {})
        schema = ((theirs.get("schema") or {}).get("openAPIV3Schema")) or {}
        got, open_ = field_paths(schema), open_paths(schema)
        out += [f"{name}: {path}" for path in sorted(want - got) if not _kept(path, open_)]
    return out


@cache
def expected_crds() -> dict[str, dict[str, Any]]:
    """CRD name (``inferenceservices.inference.tandem.dev``) -> the CRD this operator generates."""
    crds = (yaml.safe_load(text) for text in crdgen.render_all().values())
    return {crd["metadata"]["name"]: crd for crd in crds}


def summary(name: str, missing: list[str], limit: int = 8) -> str:
    """One sentence for the log: what the cluster's CRD ``name`` lacks and how to fix it."""
    shown = ", ".join(missing[:limit]) + (f" and {len(missing) - limit} more" if len(missing) > limit else "")
    return (
        f"The cluster's CRD {name} is older than this operator: it lacks {shown}. The apiserver "
        "drops those fields from every object it stores. Apply this operator's CRDs: kubectl apply "
        "--server-side -f charts/tandem/crds/ (Helm never upgrades CRDs)."
    )
