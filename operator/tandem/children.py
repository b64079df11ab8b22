"""Compares desired child objects with what the cluster has (pure).

An object needs applying when it is missing or when any field Tandem sets differs from the live
object; fields the apiserver defaults or other controllers add are ignored. This is what makes a
no-op reconcile cost zero writes while a hand-edited child is still put back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Manifest = dict[str, Any]


def is_subset(desired: Any, actual: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``actual``."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return False
        return all(key in actual and is_subset(value, actual[key]) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return False
        return all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
    if (isinstance(desired, int | float) and isinstance(actual, str)) or (
        isinstance(desired, str) and isinstance(actual, int | float)
    ):
        return str(desired) == str(actual)
    return bool(desired == actual)


def key_of(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (str(obj.get("kind", "")), str(meta.get("namespace", "")), str(meta["name"]))


def needs_apply(desired: Manifest, actual: Mapping[str, Any] | None) -> bool:
    if actual is None or actual.get("metadata", {}).get("deletionTimestamp"):
        return actual is None
    return not is_subset(desired, actual)


def plan_changes(
    desired: Iterable[Manifest], observed: Iterable[Mapping[str, Any]]
) -> tuple[list[Manifest], list[Mapping[str, Any]]]:
    """(objects to apply, objects to prune). ``observed`` is every live object we own."""
    live = {key_of(o): o for o in observed}
    wanted = {key_of(d): d for d in desired}
    to_apply = [d for k, d in wanted.items() if needs_apply(d, live.get(k))]
    to_prune = [o for k, o in live.items() if k not in wanted and not o["metadata"].get("deletionTimestamp")]
    return to_apply, to_prune


def _owns_replicas(live: Mapping[str, Any], manager: str) -> bool:
    """Whether ``manager`` applied ``spec.replicas`` of ``live`` (its managedFields)."""
    for entry in live.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if "f:replicas" in spec:
                return True
    return False


def replicas_handovers(
    desired: Iterable[Manifest], observed: Iterable[Mapping[str, Any]], manager: str
) -> list[Manifest]:
    """Deployments whose ``spec.replicas`` ``manager`` applied but now leaves out (autoscaling
    mode ``external`` or ``recommend``), each as a manifest of the live count alone: applied by
    another manager first, it keeps the count when ``manager`` drops the field, which server-side
    apply would otherwise reset to 1 (an HPA then takes it over from the live value). The live
    ``resourceVersion`` rides along as a precondition: if an HPA scaled the Deployment since it
    was read, the apiserver answers 409 instead of putting the old count back."""
    live = {key_of(o): o for o in observed if o.get("kind") == "Deployment"}
    out: list[Manifest] = []
    for d in desired:
        if d.get("kind") != "Deployment" or "replicas" in (d.get("spec") or {}):
            continue
        obj = live.get(key_of(d))
        if obj is None or obj["metadata"].get("deletionTimestamp") or not _owns_replicas(obj, manager):
            continue
        replicas = (obj.get("spec") or {}).get("replicas")
        if replicas is None:
            continue
        meta = {"name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace")}
        if obj["metadata"].get("resourceVersion"):
            meta["resourceVersion"] = obj["metadata"]["resourceVersion"]
        out.append(
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {"replicas": replicas}}
        )
    return out
