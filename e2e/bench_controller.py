"""`make bench-controller`: how fast the controller turns InferenceServices into running workers,
against the floor of applying the same objects by hand with `kubectl apply --server-side`.

Measured on the local cluster (real apiserver, scheduler and controller-manager; KWOK kubelets):
- apply_to_deployments_p50_s: from `kubectl apply` of one InferenceService until all of its
  Deployments exist (median of 20 services, one at a time);
- reconcile_100_s: from `kubectl apply` of 100 InferenceServices (3 pools each: 300 worker
  Deployments + 100 routers, with their Services and ConfigMaps) until all 100 are Ready;
- kubectl_floor_s: from `kubectl apply --server-side` of the same objects rendered by Tandem's own
  builders (the 100 InferenceServices plus their 900 children, no operator watching) until all
  400 Deployments are ready;
- reconcile_over_floor: the ratio (goal: at most 1.5).
Writes bench/out/controller.json. Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.bench_scale import service_doc  # index 0: B200 prefill, Gaudi 3 decode, H100 mixed
from e2e.harness import cluster as cluster_mod
from e2e.harness import fleet as fleet_mod
from e2e.harness.common import REPO_ROOT, STATE_ROOT, wait_for, write_result
from e2e.harness.operator import OperatorProcess, install_crds
from tandem.builders import ServiceContext, desired_objects
from tandem.models import InferenceServiceSpec
from tandem.planner import base_replicas
from tandem.resolve import resolve

SAMPLES = REPO_ROOT / "e2e" / "samples"
SCALE_FLEET = REPO_ROOT / "e2e" / "fleets" / "scale-200.yaml"


def items(cluster: Any, namespace: str, kind: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kind, "-n", namespace, "-o", "json", timeout=120).stdout
    return json.loads(out)["items"]  # type: ignore[no-any-return]


def count_ready_services(cluster: Any, namespace: str) -> int:
    n = 0
    for svc in items(cluster, namespace, "tisvc"):
        st = svc.get("status") or {}
        ok = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
        n += ok and st.get("observedGeneration") == svc["metadata"]["generation"]
    return n


def count_ready_deployments(cluster: Any, namespace: str) -> int:
    return sum(
        1
        for d in items(cluster, namespace, "deployments")
        if (d.get("status") or {}).get("readyReplicas", 0) >= d["spec"].get("replicas", 1)
    )


def measure_apply_to_deployments(cluster: Any, namespace: str, runs: int) -> list[float]:
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api())
    times = []
    for i in range(runs):
        name = f"lat-{i}"
        t0 = time.monotonic()
        cluster.kubectl(
            "apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(service_doc(name))
        )

        def created(name: str = name) -> bool:
            # the API client, not a kubectl process per poll: the poll must not load the machine
            found = apps.list_namespaced_deployment(
                namespace, label_selector=f"inference.tandem.dev/service={name}"
            )
            return len(found.items) == 4

        wait_for(created, timeout=60, interval=0.02, what=f"the Deployments of {name}")
        times.append(time.monotonic() - t0)
        cluster.kubectl("delete", "tisvc", name, "-n", namespace, "--wait=false")
    return times


def render_by_hand(namespace: str, count: int, pools: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator would create for ``count`` services, rendered by its own builders."""
    objects: list[dict[str, Any]] = []
    for i in range(count):
        doc = service_doc(f"svc-{i}")
        doc["metadata"]["namespace"] = namespace
        objects.append(doc)
        spec = InferenceServiceSpec.model_validate(doc["spec"])
        resolution = resolve(spec, pools)
        ctx = ServiceContext(
            name=f"svc-{i}",
            namespace=namespace,
            uid="floor",
            spec=spec,
            accelerator_pools=resolution.accelerator_pools,
            replicas=base_replicas(spec, {}),
        )
        for obj in desired_objects(ctx):
            obj["metadata"].pop("ownerReferences", None)
            objects.append(obj)
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default="bench/out/controller.json")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args(argv)

    cluster = cluster_mod.running() or cluster_mod.up()
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    scale = fleet_mod.load_fleet(SCALE_FLEET)
    fleet_mod.register_and_wait(cluster.api(), scale, timeout=180)
    pools = {
        d["metadata"]["name"]: d["spec"]
        for d in yaml.safe_load_all((SAMPLES / "acceleratorpools.yaml").read_text())
    }
    stamp = int(time.time())
    ns_op, ns_floor = f"bench-operator-{stamp}", f"bench-floor-{stamp}"
    for ns in (ns_op, ns_floor):
        cluster.kubectl("create", "namespace", ns)
    wait_for(
        lambda: all(
            "default" in cluster.kubectl("get", "sa", "-n", ns, "-o", "name").stdout
            for ns in (ns_op, ns_floor)
        ),
        timeout=30,
        what="default service accounts",
    )
    per_service = render_by_hand("x", 1, pools)[1:]
    result: dict[str, Any] = {
        "services": args.services,
        "deployments_per_service": sum(1 for o in per_service if o["kind"] == "Deployment"),
        "objects_per_service": len(per_service),
    }
    op = OperatorProcess(
        cluster.kubeconfig,
        STATE_ROOT / "bench" / "operator.log",
        namespaces=[ns_op],
        resync_seconds=60,
        standalone=True,
    )
    try:
        op.start()
        lat = measure_apply_to_deployments(cluster, ns_op, args.latency_runs)
        result["apply_to_deployments_p50_s"] = round(statistics.median(lat), 3)
        result["apply_to_deployments_max_s"] = round(max(lat), 3)
        wait_for(
            lambda: not items(cluster, ns_op, "deployments"), timeout=120, what="latency services collected"
        )

        with tempfile.TemporaryDirectory() as tmp:
            batch = Path(tmp) / "services.yaml"
            batch.write_text(yaml.safe_dump_all([service_doc(f"svc-{i}") for i in range(args.services)]))
            writes0 = op.kube_writes()
            t0 = time.monotonic()
            cluster.kubectl("apply", "--server-side", "-n", ns_op, "-f", str(batch), timeout=300)
            wait_for(
                lambda: count_ready_services(cluster, ns_op) == args.services,
                timeout=900,
                interval=0.25,
                what=f"{args.services} InferenceServices Ready",
            )
            result["reconcile_100_s"] = round(time.monotonic() - t0, 2)
            result["operator_writes"] = op.kube_writes() - writes0
        op.stop()
        # free the service IPs and devices before the floor run
        cluster.kubectl("delete", "namespace", ns_op, "--wait=true", "--timeout=300s", timeout=320)

        with tempfile.TemporaryDirectory() as tmp:
            floor = Path(tmp) / "floor.yaml"
            objects = render_by_hand(ns_floor, args.services, pools)
            floor.write_text(yaml.safe_dump_all(objects))
            deployments = sum(1 for o in objects if o["kind"] == "Deployment")
            t0 = time.monotonic()
            cluster.kubectl("apply", "--server-side", "-n", ns_floor, "-f", str(floor), timeout=600)
            wait_for(
                lambda: count_ready_deployments(cluster, ns_floor) == deployments,
                timeout=900,
                interval=0.25,
                what=f"{deployments} Deployments ready",
            )
            result["kubectl_floor_s"] = round(time.monotonic() - t0, 2)
            result["floor_objects"] = len(objects)
        result["reconcile_over_floor"] = round(result["reconcile_100_s"] / result["kubectl_floor_s"], 3)
    finally:
        op.stop()
        for ns in (ns_op, ns_floor):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        removed = fleet_mod.unregister(cluster.api(), scale)
        print(f"Unregistered {removed} scale nodes", file=sys.stderr)
    return write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
