"""Fake GPU fleets: load a fleet file (e2e/fleets/*.yaml) and register its nodes with a cluster.

The nodes are plain ``v1.Node`` objects annotated ``kwok.x-k8s.io/node: fake``; the kwok controller
takes them over (node-initialize stage) and keeps them Ready. Their capacity and allocatable carry
the vendor device resources, so kube-scheduler places pods on them exactly as on real GPU nodes:
nodeSelector, affinity, taints and extended resources all apply.

Run as a script::

    python -m e2e.harness.fleet show e2e/fleets/demo.yaml
    python -m e2e.harness.fleet register e2e/fleets/demo.yaml [--kubeconfig PATH]
    python -m e2e.harness.fleet unregister e2e/fleets/demo.yaml [--kubeconfig PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.harness.common import REPO_ROOT, log, wait_for

FLEETS_DIR = REPO_ROOT / "e2e" / "fleets"
DEFAULT_FLEET = FLEETS_DIR / "demo.yaml"

FLEET_LABEL = "inference.tandem.dev/fleet"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_VALUE = "fake"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str = ""


@dataclass(frozen=True)
class NodeGroup:
    """``count`` identical nodes named ``<name_prefix>-<index>``."""

    name_prefix: str
    count: int
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    capacity: Mapping[str, str] = field(default_factory=dict)

    def node_names(self) -> list[str]:
        return [f"{self.name_prefix}-{i}" for i in range(self.count)]


@dataclass(frozen=True)
class Fleet:
    name: str
    groups: tuple[NodeGroup, ...]

    @property
    def size(self) -> int:
        return sum(g.count for g in self.groups)

    def node_names(self) -> list[str]:
        return [name for g in self.groups for name in g.node_names()]


def _str_map(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, bool):  # YAML `true` would otherwise become "True"
            value = "true" if value else "false"
        out[str(key)] = str(value)
    return out


def _taints(raw: Any, where: str) -> tuple[Taint, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of taints")
    taints = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or "key" not in item or "effect" not in item:
            raise ValueError(f"{where}[{i}]: a taint needs key and effect")
        if item["effect"] not in TAINT_EFFECTS:
            raise ValueError(f"{where}[{i}]: effect must be one of {TAINT_EFFECTS}")
        taints.append(
            Taint(key=str(item["key"]), effect=str(item["effect"]), value=str(item.get("value", "")))
        )
    return tuple(taints)


def parse_fleet(doc: Mapping[str, Any], *, source: str = "fleet") -> Fleet:
    """Validates a fleet document and merges ``defaults`` into each group."""
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: `name` is required")
    defaults = doc.get("defaults") or {}
    d_labels = _str_map(defaults.get("labels"), f"{source}: defaults.labels")
    d_annotations = _str_map(defaults.get("annotations"), f"{source}: defaults.annotations")
    d_taints = _taints(defaults.get("taints"), f"{source}: defaults.taints")
    d_capacity = _str_map(defaults.get("capacity"), f"{source}: defaults.capacity")
    raw_groups = doc.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise ValueError(f"{source}: `groups` must be a non-empty list")
    groups: list[NodeGroup] = []
    seen_prefixes: set[str] = set()
    for i, raw in enumerate(raw_groups):
        where = f"{source}: groups[{i}]"
        prefix = raw.get("namePrefix")
        count = raw.get("count")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{where}: `namePrefix` is required")
        if prefix in seen_prefixes:
            raise ValueError(f"{where}: duplicate namePrefix {prefix!r}")
        seen_prefixes.add(prefix)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{where}: `count` must be a non-negative integer")
        groups.append(
            NodeGroup(
                name_prefix=prefix,
                count=count,
                labels={**d_labels, **_str_map(raw.get("labels"), f"{where}.labels")},
                annotations={**d_annotations, **_str_map(raw.get("annotations"), f"{where}.annotations")},
                taints=d_taints + _taints(raw.get("taints"), f"{where}.taints"),
                capacity={**d_capacity, **_str_map(raw.get("capacity"), f"{where}.capacity")},
            )
        )
    return Fleet(name=name, groups=tuple(groups))


def load_fleet(path: Path | str) -> Fleet:
    """Reads and validates a fleet file."""
    path = Path(path)
    return parse_fleet(yaml.safe_load(path.read_text()), source=str(path))


def build_node(fleet: Fleet, group: NodeGroup, name: str) -> dict[str, Any]:
    """The v1.Node manifest for one fake node (pure; status included, as a kubelet would send)."""
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **group.labels,
        FLEET_LABEL: fleet.name,
    }
    annotations = {
        "node.alpha.kubernetes.io/ttl": "0",
        **group.annotations,
        KWOK_NODE_ANNOTATION: KWOK_NODE_VALUE,
    }
    taints = [{"key": t.key, "value": t.value, "effect": t.effect} for t in group.taints]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        # kwok's docs: a providerID keeps cloud-provider node cleanup away from fake nodes.
        "spec": {"providerID": f"kwok://{name}", "taints": taints},
        "status": {"capacity": dict(group.capacity), "allocatable": dict(group.capacity)},
    }


def build_nodes(fleet: Fleet) -> list[dict[str, Any]]:
    return [build_node(fleet, g, name) for g in fleet.groups for name in g.node_names()]


def _core_api(api_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client)


def _up_to_date(node: Any, body: dict[str, Any]) -> bool:
    meta = body["metadata"]
    labels = node.metadata.labels or {}
    annotations = node.metadata.annotations or {}
    taints = [{"key": t.key, "value": t.value or "", "effect": t.effect} for t in node.spec.taints or []]
    return (
        all(labels.get(k) == v for k, v in meta["labels"].items())
        and all(annotations.get(k) == v for k, v in meta["annotations"].items())
        and taints == body["spec"]["taints"]
    )


def register(api_client: Any, fleet: Fleet) -> tuple[int, int]:
    """Creates the fleet's nodes; existing ones get their labels, annotations and taints re-applied.

    Returns (created, updated). Idempotent: nodes already as the file says are left alone. Nodes of
    this fleet that the file no longer lists are deleted, so the registered fleet matches the file.
    Capacity is not updated on existing nodes (status belongs to kwok once it manages the node).
    """
    from kubernetes.client.exceptions import ApiException

    core = _core_api(api_client)
    existing = {
        n.metadata.name: n for n in core.list_node(label_selector=f"{FLEET_LABEL}={fleet.name}").items
    }
    created = updated = 0
    for body in build_nodes(fleet):
        name = body["metadata"]["name"]
        if name in existing:
            if not _up_to_date(existing[name], body):
                meta = {k: body["metadata"][k] for k in ("labels", "annotations")}
                core.patch_node(name, {"metadata": meta, "spec": body["spec"]})
                updated += 1
            continue
        try:
            core.create_node(body)
            created += 1
        except ApiException as exc:
            if exc.status != 409:
                raise
            core.patch_node(name, {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]})
            updated += 1
    for stale in set(existing) - set(fleet.node_names()):
        core.delete_node(stale)
    return created, updated


def unregister(api_client: Any, fleet: Fleet) -> int:
    """Deletes every node labelled as part of this fleet; returns how many."""
    core = _core_api(api_client)
    nodes = core.list_node(label_selector=f"{FLEET_LABEL}={fleet.name}").items
    for node in nodes:
        core.delete_node(node.metadata.name)
    return len(nodes)


def _is_ready(node: Any) -> bool:
    """Ready, and free of the node lifecycle controller's taints (``node.kubernetes.io/not-ready``
    and friends), which kube-controller-manager puts on new nodes and lifts a moment after they
    turn Ready; until then the scheduler would refuse them."""
    ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])


def wait_ready(api_client: Any, fleet: Fleet, *, timeout: float = 60.0) -> None:
    """Blocks until every node of the fleet is Ready (kwok's node-initialize stage) and schedulable."""
    core = _core_api(api_client)
    want = set(fleet.node_names())

    def all_ready() -> bool:
        nodes = core.list_node(label_selector=f"{FLEET_LABEL}={fleet.name}").items
        ready = {n.metadata.name for n in nodes if _is_ready(n)}
        return want <= ready

    wait_for(
        all_ready,
        timeout=timeout,
        interval=0.5,
        what=f"{len(want)} nodes of fleet {fleet.name} Ready and schedulable",
    )


def register_and_wait(api_client: Any, fleet: Fleet, *, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    created, updated = register(api_client, fleet)
    wait_ready(api_client, fleet, timeout=timeout)
    log(
        f"Registered fleet {fleet.name}: {fleet.size} nodes Ready "
        f"({created} created, {updated} updated) in {time.monotonic() - t0:.1f} s"
    )


def describe(fleet: Fleet) -> str:
    lines = [f"fleet {fleet.name}: {fleet.size} nodes"]
    for g in fleet.groups:
        devices = {k: v for k, v in g.capacity.items() if "/" in k}
        taints = ", ".join(f"{t.key}={t.value}:{t.effect}" for t in g.taints) or "-"
        lines.append(f"  {g.name_prefix}-[0..{g.count - 1}]  {devices}  taints: {taints}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.harness.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["show", "register", "unregister"])
    parser.add_argument("fleet", nargs="?", default=str(DEFAULT_FLEET), help="fleet file (default: demo)")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the local cluster's")
    args = parser.parse_args(argv)
    fleet = load_fleet(args.fleet)
    if args.action == "show":
        print(describe(fleet))
        return 0
    from kubernetes import config

    from e2e.harness.cluster import KUBECONFIG_PATH

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG") or str(KUBECONFIG_PATH)
    api_client = config.new_client_from_config(config_file=kubeconfig)
    if args.action == "register":
        register_and_wait(api_client, fleet)
    else:
        log(f"Deleted {unregister(api_client, fleet)} nodes of fleet {fleet.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
