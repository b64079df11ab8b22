"""Fault injection: the operator never makes things worse when something around it fails.

* kill -9 in the middle of reconciling 50 InferenceServices, restart: it converges to exactly the
  desired children (no duplicates, no orphans, no rewritten pod templates);
* kube-apiserver and etcd stopped and restarted under the running operator (on a private side
  cluster, e2e/harness/faults.py): it reconnects, notices changes made after the restart, converges;
* two replicas on one peering: only one acts; when it dies, the other takes over.

(Prometheus faults are covered by e2e/test_planner_loop.py.)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.common import STATE_ROOT, sim_service, wait_for
from e2e.harness.faults import SideCluster, side_cluster
from e2e.harness.operator import OperatorProcess, install_crds, wait_seconds
from tandem.builders import ServiceContext, desired_objects
from tandem.models import InferenceServiceSpec
from tandem.planner import base_replicas
from tandem.resolve import resolve

SAMPLES = Path(__file__).parent / "samples"
SERVICE_LABEL = "inference.tandem.dev/service"
MANAGED = "app.kubernetes.io/managed-by=tandem"
CHILD_KINDS = "deployments,services,configmaps,poddisruptionbudgets,serviceaccounts,roles,rolebindings"


def service_doc(name: str, pools: int = 2) -> dict[str, Any]:
    """A small service: decode + mixed (and prefill with ``pools=3``), one device per pool."""
    spec_pools = [("decode", "decode", "gaudi3"), ("mixed", "mixed", "h100")]
    if pools == 3:
        spec_pools.insert(0, ("prefill", "prefill", "b200"))
    return sim_service(name, spec_pools)


def get(cluster: Any, namespace: str | None, *what: str) -> list[dict[str, Any]]:
    ns = ["-n", namespace] if namespace else []
    out = cluster.kubectl("get", *what, *ns, "-o", "json", timeout=120).stdout
    doc = json.loads(out)
    return doc.get("items", [doc])  # type: ignore[no-any-return]


def apply_docs(cluster: Any, namespace: str, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), timeout=300
    )


def pool_specs(cluster: Any) -> dict[str, Any]:
    return {p["metadata"]["name"]: p["spec"] for p in get(cluster, None, "acceleratorpools")}


def desired_children(namespace: str, docs: list[dict[str, Any]], pools: dict[str, Any]) -> dict[str, Any]:
    """Every child Tandem's own builders want for ``docs``, by kind/name."""
    want: dict[str, Any] = {}
    for doc in docs:
        spec = InferenceServiceSpec.model_validate(doc["spec"])
        ctx = ServiceContext(
            name=doc["metadata"]["name"],
            namespace=namespace,
            uid="x",
            spec=spec,
            accelerator_pools=resolve(spec, pools).accelerator_pools,
            replicas=base_replicas(spec, {}),
        )
        want |= {f"{o['kind']}/{o['metadata']['name']}": o for o in desired_objects(ctx)}
    return want


def rolled_out(
    cluster: Any, namespace: str, old: list[dict[str, Any]], new: list[dict[str, Any]]
) -> set[str]:
    """The Deployments whose pod template the change from ``old`` to ``new`` specs alters: each
    legitimately rolls out, so it ends with two ReplicaSets."""
    pools = pool_specs(cluster)
    before, after = desired_children(namespace, old, pools), desired_children(namespace, new, pools)
    return {
        obj["metadata"]["name"]
        for key, obj in after.items()
        if obj["kind"] == "Deployment"
        and key in before
        and obj["spec"]["template"] != before[key]["spec"]["template"]
    }


def deployments_observed(cluster: Any, namespace: str) -> bool:
    """The deployment controller has synced every Deployment's current generation (so each has
    the ReplicaSets its pod template calls for)."""
    return all(
        (d.get("status") or {}).get("observedGeneration") == d["metadata"]["generation"]
        for d in live_deployments(cluster, namespace)
    )


def live_deployments(cluster: Any, namespace: str) -> list[dict[str, Any]]:
    return [d for d in get(cluster, namespace, "deployments") if not d["metadata"].get("deletionTimestamp")]


def live_children(cluster: Any, namespace: str) -> list[dict[str, Any]]:
    return [
        o
        for o in get(cluster, namespace, CHILD_KINDS, "-l", MANAGED)
        if not o["metadata"].get("deletionTimestamp")
    ]


def converged(cluster: Any, namespace: str, names: set[str]) -> bool:
    """Every service's current generation reconciled (Ready is True or False with a reason)."""
    services = {s["metadata"]["name"]: s for s in get(cluster, namespace, "inferenceservices")}
    if set(services) != names:
        return False
    for svc in services.values():
        status = svc.get("status") or {}
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        if status.get("observedGeneration") != svc["metadata"]["generation"] or not ready:
            return False
    return True


def assert_exact_children(
    cluster: Any, namespace: str, docs: list[dict[str, Any]], rolled: set[str] | None = None
) -> None:
    """``rolled``: Deployments a spec change rolled out (two ReplicaSets), see ``rolled_out``."""
    want = set(desired_children(namespace, docs, pool_specs(cluster)))
    live = live_children(cluster, namespace)
    keys = [f"{o['kind']}/{o['metadata']['name']}" for o in live]
    assert len(keys) == len(set(keys))
    assert set(keys) == want, (
        f"orphans: {sorted(set(keys) - want)[:10]}, missing: {sorted(want - set(keys))[:10]}"
    )
    names = {d["metadata"]["name"] for d in docs}
    uids = {s["metadata"]["uid"] for s in get(cluster, namespace, "inferenceservices")}
    for obj in live:  # every child is owned by a live service, exactly once
        owners = [r for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")]
        assert len(owners) == 1 and owners[0]["uid"] in uids, obj["metadata"]["name"]
        assert obj["metadata"]["labels"][SERVICE_LABEL] in names
    # no duplicated rollouts: one ReplicaSet per Deployment, two where a spec change rolled it (a
    # pod template rewritten by the restarted operator would have made one more). Counted once
    # the deployment controller caught up: a kube-controller-manager restarted with the
    # apiserver waits out its predecessor's leader lease (15 s) before it makes any.
    wait_for(lambda: deployments_observed(cluster, namespace), timeout=120, what="Deployments observed")
    deployments = {d["metadata"]["name"] for d in live_deployments(cluster, namespace)}
    per_deployment: dict[str, int] = {}
    for rs in get(cluster, namespace, "replicasets"):
        for ref in rs["metadata"].get("ownerReferences", []):
            if ref["name"] in deployments:  # not those of a pruned one, still being collected
                per_deployment[ref["name"]] = per_deployment.get(ref["name"], 0) + 1
    expected = {name: 2 if name in (rolled or set()) else 1 for name in deployments}
    assert per_deployment == expected, per_deployment


@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))


def test_kill_9_mid_reconcile_then_restart_converges_exactly(
    cluster: Any, namespace: str, crds: None, diagnostics: Any
) -> None:
    docs = [service_doc(f"svc-{i:02d}") for i in range(50)]
    op = OperatorProcess.for_namespace(cluster, namespace, resync_seconds=5.0)
    diagnostics.add_log(op.log_path)
    names = {d["metadata"]["name"] for d in docs}
    try:
        op.start()
        apply_docs(cluster, namespace, docs)
        # kill once the operator is well into the batch, but before it is done
        wait_for(lambda: op.kube_writes() >= 40, timeout=120, interval=0.05, what="40 operator writes")
        op.kill()
        done_before = sum(1 for _ in live_children(cluster, namespace))
        assert not converged(cluster, namespace, names), "the kill came too late to test anything"
        # a hand deletion while the operator is down must be repaired too
        cluster.kubectl("delete", "tisvc", "svc-49", "-n", namespace, "--wait=false")
        docs = docs[:-1]
        names.discard("svc-49")
        op.start()
        wait_for(lambda: converged(cluster, namespace, names), timeout=300, what="49 services reconciled")
        wait_for(
            lambda: (
                not any(
                    o["metadata"]["labels"].get(SERVICE_LABEL) == "svc-49"
                    for o in live_children(cluster, namespace)
                )
            ),
            timeout=120,
            what="svc-49's children garbage-collected",
        )
        assert_exact_children(cluster, namespace, docs)
        assert "Traceback" not in op.log_text()
        print(f"killed after {done_before} children existed; converged to {len(docs)} services")
    finally:
        op.stop()


def test_two_replicas_only_one_acts_and_the_other_takes_over(
    cluster: Any, namespace: str, crds: None, diagnostics: Any
) -> None:
    """Two replicas started exactly as the chart starts them (same flags, same peering)."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        "-f",
        "-",
        input="apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata:\n  name: tandem\n",
    )
    ops = [
        OperatorProcess(
            cluster.kubeconfig,
            STATE_ROOT / "e2e" / f"operator-{namespace}-{i}.log",
            namespaces=[namespace],
            resync_seconds=2.0,
        )
        for i in range(2)
    ]
    for op in ops:
        diagnostics.add_log(op.log_path)
    try:
        for op in ops:
            op.start()
        apply_docs(cluster, namespace, [service_doc("one")])
        wait_for(lambda: converged(cluster, namespace, {"one"}), timeout=120, what="one reconciled")
        reconciles = [op.reconciles() for op in ops]
        assert sorted(r > 0 for r in reconciles) == [False, True], reconciles  # exactly one acts
        active, standby = (ops[0], ops[1]) if reconciles[0] else (ops[1], ops[0])
        # The replica that started first acts alone until the other's heartbeat appears (seconds
        # on a loaded machine), and may write AcceleratorPool statuses meanwhile: correct, it was
        # the only peer. Its own loops learn that they stand by from their next peering poll, up
        # to a second after kopf paused (CI once counted a status write in that second). From
        # then on the standby writes nothing, over several resync periods (its own loops, not
        # only kopf's handlers).
        wait_for(lambda: stands_by(standby), timeout=60, what="the standby's own loops stand by")
        wait_seconds(2.0)  # a write already under way when the verdict changed
        writes = standby.kube_writes()
        wait_seconds(3 * 2.0)
        assert standby.reconciles() == 0 and standby.kube_writes() == writes
        active.kill()
        apply_docs(cluster, namespace, [service_doc("two")])
        wait_for(lambda: converged(cluster, namespace, {"one", "two"}), timeout=180, what="failover")
        assert standby.reconciles() > 0 and standby.kube_writes() > 0
        assert_exact_children(cluster, namespace, [service_doc("one"), service_doc("two")])
    finally:
        for op in ops:
            op.stop()


def stands_by(op: OperatorProcess) -> bool:
    """The replica's own peering loop (``tandem.peering``) has not acted, or last logged that it
    stands by."""
    verdicts = re.findall(r"this replica \(priority -?\d+\) (acts|stands by)", op.log_text())
    return not verdicts or verdicts[-1] == "stands by"


@pytest.fixture(scope="module")
def side(request: pytest.FixtureRequest) -> Iterator[SideCluster]:
    yield side_cluster(request.config)


def test_apiserver_and_etcd_restart_under_the_operator(side: SideCluster, diagnostics: Any) -> None:
    cluster = side.cluster
    assert cluster is not None
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    # a fresh namespace: `side_cluster` reuses a side cluster that is already running (another
    # session's), and one left with this test's services would never converge to {"before"}
    ns = f"faults-restart-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", ns)
    wait_for(lambda: "default" in cluster.kubectl("get", "sa", "-n", ns, "-o", "name").stdout, timeout=30)
    op = OperatorProcess.for_namespace(cluster, ns, resync_seconds=3.0)
    diagnostics.add_log(op.log_path)
    first = service_doc("before", pools=3)
    try:
        op.start()
        apply_docs(cluster, ns, [first])
        wait_for(lambda: converged(cluster, ns, {"before"}), timeout=120, what="before reconciled")
        side.restart_control_plane()
        assert op.proc is not None and op.proc.poll() is None, "the operator exited with the apiserver"
        # changes made after the restart reach the operator through its re-established watches
        smaller = service_doc("before", pools=2)
        apply_docs(cluster, ns, [smaller, service_doc("after")])
        wait_for(
            lambda: (
                converged(cluster, ns, {"before", "after"})
                and not get(
                    cluster,
                    ns,
                    "deployments",
                    "-l",
                    f"{SERVICE_LABEL}=before,inference.tandem.dev/pool=prefill",
                )
            ),
            timeout=180,
            what="changes after the restart reconciled",
        )
        rolled = rolled_out(cluster, ns, [first], [smaller])  # decode's KV profile names its peer
        assert_exact_children(cluster, ns, [smaller, service_doc("after")], rolled)
        assert op.healthy()
    finally:
        op.stop()
        # the side cluster may outlive this session (`side_cluster` reuses a running one)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
