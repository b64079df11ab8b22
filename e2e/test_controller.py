"""The core controller on the real local cluster: InferenceService -> workers on the right nodes.

One operator process (the real `tandem operator` entrypoint) serves the whole module; each test
has its own namespace. AcceleratorPools are cluster-scoped and shared (e2e/samples).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds, wait_seconds

SAMPLES = Path(__file__).parent / "samples"
RESYNC = 2.0


@pytest.fixture(scope="module")
def operator(cluster: Any) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    op = OperatorProcess(
        cluster.kubeconfig, STATE_ROOT / "e2e" / "operator-controller.log", resync_seconds=RESYNC
    )
    with op:
        yield op


@pytest.fixture
def op(operator: OperatorProcess, diagnostics: Any) -> OperatorProcess:
    diagnostics.add_log(operator.log_path)
    return operator


def sample(name: str = "llama") -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"]["name"] = name
    return doc  # type: ignore[no-any-return]


def apply(cluster: Any, doc: dict[str, Any], namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get(cluster: Any, namespace: str | None, *what: str) -> dict[str, Any]:
    ns = ["-n", namespace] if namespace else []
    return json.loads(cluster.kubectl("get", *what, *ns, "-o", "json").stdout)  # type: ignore[no-any-return]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    return None


def wait_ready(cluster: Any, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        svc = get(cluster, namespace, "tisvc", name)
        c = condition(svc, "Ready")
        gen = svc["metadata"]["generation"]
        ok = c and c["status"] == "True" and svc["status"].get("observedGeneration") == gen
        return svc if ok and c and c.get("observedGeneration") == gen else None

    return wait_for(ready, timeout=timeout, what=f"InferenceService {namespace}/{name} Ready")


def pods_by_pool(cluster: Any, namespace: str, service: str) -> dict[str, list[dict[str, Any]]]:
    pods = get(cluster, namespace, "pods", "-l", f"inference.tandem.dev/service={service}")["items"]
    out: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        if p["metadata"].get("deletionTimestamp"):
            continue
        pool = p["metadata"]["labels"].get("inference.tandem.dev/pool", "router")
        out.setdefault(pool, []).append(p)
    return out


def node_models(cluster: Any) -> dict[str, str]:
    nodes = get(cluster, None, "nodes")["items"]
    return {
        n["metadata"]["name"]: n["metadata"]["labels"].get("inference.tandem.dev/accelerator-model", "cpu")
        for n in nodes
    }


def deployments(cluster: Any, namespace: str) -> dict[str, dict[str, Any]]:
    items = get(cluster, namespace, "deployments")["items"]
    return {d["metadata"]["name"]: d for d in items if not d["metadata"].get("deletionTimestamp")}


def test_apply_runs_each_pool_on_its_vendor(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, sample(), namespace)
    svc = wait_ready(cluster, namespace, "llama")
    assert set(deployments(cluster, namespace)) == {
        "llama-prefill",
        "llama-decode",
        "llama-mixed",
        "llama-router",
    }
    models = node_models(cluster)
    pods = pods_by_pool(cluster, namespace, "llama")
    expected = {"prefill": ("B200", 1), "decode": ("Gaudi3", 2), "mixed": ("H100-SXM", 1)}
    for pool, (model, count) in expected.items():
        assert len(pods[pool]) == count, pool
        for p in pods[pool]:
            assert p["status"]["phase"] == "Running"
            assert models[p["spec"]["nodeName"]] == model, (pool, p["spec"]["nodeName"])
    assert models[pods["router"][0]["spec"]["nodeName"]] == "cpu"

    # one PodDisruptionBudget per pool; the real disruption controller counts the pool's pods
    def budgets_counted() -> dict[str, Any] | None:
        pdbs = {p["metadata"]["name"]: p for p in get(cluster, namespace, "pdb")["items"]}
        counted = all(
            (pdbs.get(f"llama-{pool}") or {}).get("status", {}).get("expectedPods") for pool in expected
        )
        return pdbs if counted else None

    pdbs = wait_for(budgets_counted, timeout=60, what="the pools' PodDisruptionBudgets counting their pods")
    assert set(pdbs) == {"llama-prefill", "llama-decode", "llama-mixed"}
    for pool, (_, count) in expected.items():
        pdb = pdbs[f"llama-{pool}"]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["status"]["expectedPods"] == count, pool
        assert pdb["status"]["currentHealthy"] == count, pool
        assert pdb["status"]["disruptionsAllowed"] == 1, pool
    status = svc["status"]
    assert status["ratio"] == "1:2"
    assert status["replicas"] == {"prefill": "1/1", "decode": "2/2", "mixed": "1/1"}
    assert status["endpoint"] == f"http://llama-router.{namespace}.svc:8000"
    assert {p["name"]: p["vendor"] for p in status["pools"]} == {
        "prefill": "nvidia",
        "decode": "intel",
        "mixed": "nvidia",
    }
    table = cluster.kubectl("get", "tisvc", "-n", namespace).stdout
    assert "P:D" in table and "1:2" in table and "True" in table

    def pool_counted() -> dict[str, Any] | None:
        st = get(cluster, None, "accpool", "b200").get("status") or {}
        return st if st.get("allocatedDevices", 0) >= 4 else None

    b200 = wait_for(pool_counted, timeout=30, what="AcceleratorPool b200 status counting the prefill pod")
    assert (b200["matchingNodes"], b200["allocatableDevices"]) == (2, 16)
    assert condition({"status": b200}, "Ready")["status"] == "True"  # type: ignore[index]
    wait_for(
        lambda: any(
            e.get("reason") == "Applied" and "Deployment" in (e.get("message") or e.get("note") or "")
            for e in get(cluster, namespace, "events")["items"]
        ),
        timeout=30,
        what="an Applied Event for a Deployment",
    )


def test_noop_reconcile_writes_nothing(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, sample(), namespace)
    wait_ready(cluster, namespace, "llama")

    # The write counter is the operator's, across namespaces: an earlier test's service still
    # being deleted (its finalizer removed as its namespace goes) counted 7 writes here once.
    def alone() -> bool:
        services = get(cluster, None, "tisvc", "-A")["items"]
        return all(o["metadata"]["namespace"] == namespace for o in services)

    wait_for(alone, timeout=60, what="other tests' InferenceServices gone")
    wait_seconds(RESYNC * 2)  # let the last status writes and their watch events settle

    def versions() -> dict[str, str]:
        objs = get(cluster, namespace, "deployments,services,configmaps,tisvc")["items"]
        return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in objs}

    before_rv, before_writes, before_reconciles = versions(), op.kube_writes(), op.reconciles()
    wait_seconds(RESYNC * 4)  # four resync periods: every service is reconciled again
    after_writes, after_reconciles = op.kube_writes(), op.reconciles()
    assert after_reconciles >= before_reconciles + 3, "the resync did not run"
    assert after_writes - before_writes == 0
    assert versions() == before_rv


def test_changing_a_pools_accelerator_moves_its_pods(
    cluster: Any, namespace: str, op: OperatorProcess
) -> None:
    doc = sample()
    apply(cluster, doc, namespace)
    wait_ready(cluster, namespace, "llama")
    changed = copy.deepcopy(doc)
    changed["spec"]["pools"][2]["acceleratorPool"] = "mi300x"  # mixed: H100 -> MI300X
    apply(cluster, changed, namespace)
    models = node_models(cluster)

    def moved() -> bool:
        pods = pods_by_pool(cluster, namespace, "llama").get("mixed", [])
        return bool(pods) and all(
            p["status"].get("phase") == "Running" and models.get(p["spec"].get("nodeName", "")) == "MI300X"
            for p in pods
        )

    wait_for(moved, timeout=90, what="the mixed pool's pods on MI300X nodes")
    svc = wait_ready(cluster, namespace, "llama")
    assert {p["name"]: p["vendor"] for p in svc["status"]["pools"]}["mixed"] == "amd"
    limits = deployments(cluster, namespace)["llama-mixed"]["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]
    assert limits.get("amd.com/gpu") == "4" and "nvidia.com/gpu" not in limits


def test_removed_pool_is_pruned_and_deletion_collects_everything(
    cluster: Any, namespace: str, op: OperatorProcess
) -> None:
    doc = sample()
    apply(cluster, doc, namespace)
    wait_ready(cluster, namespace, "llama")
    smaller = copy.deepcopy(doc)
    smaller["spec"]["pools"] = [p for p in smaller["spec"]["pools"] if p["name"] != "mixed"]
    apply(cluster, smaller, namespace)
    wait_for(
        lambda: "llama-mixed" not in deployments(cluster, namespace), timeout=60, what="llama-mixed pruned"
    )
    wait_for(
        lambda: (
            "llama-mixed" not in {s["metadata"]["name"] for s in get(cluster, namespace, "services")["items"]}
        ),
        timeout=30,
        what="Service llama-mixed pruned",
    )
    wait_for(
        lambda: "llama-mixed" not in {p["metadata"]["name"] for p in get(cluster, namespace, "pdb")["items"]},
        timeout=30,
        what="PodDisruptionBudget llama-mixed pruned",
    )
    svc = wait_ready(cluster, namespace, "llama")
    assert [p["name"] for p in svc["status"]["pools"]] == ["prefill", "decode"]

    cluster.kubectl("delete", "tisvc", "llama", "-n", namespace, "--wait=true", "--timeout=60s")

    def all_gone() -> bool:
        left = get(
            cluster,
            namespace,
            "deployments,services,configmaps,poddisruptionbudgets,pods",
            "-l",
            "inference.tandem.dev/service=llama",
        )
        return not left["items"]

    # owner references + the real kube-controller-manager's garbage collector
    wait_for(all_gone, timeout=90, what="every child of llama garbage-collected")


def test_hand_edits_and_deletions_are_restored(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, sample(), namespace)
    wait_ready(cluster, namespace, "llama")
    original = deployments(cluster, namespace)["llama-decode"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    cluster.kubectl(
        "set", "image", "deployment/llama-decode", "engine=example.invalid/hand-edited:1", "-n", namespace
    )
    cluster.kubectl("scale", "deployment/llama-prefill", "--replicas=3", "-n", namespace)
    cluster.kubectl("delete", "service", "llama-decode", "-n", namespace)

    def restored() -> bool:
        deps = deployments(cluster, namespace)
        image = deps["llama-decode"]["spec"]["template"]["spec"]["containers"][0]["image"]
        services = {s["metadata"]["name"] for s in get(cluster, namespace, "services")["items"]}
        return (
            image == original
            and deps["llama-prefill"]["spec"]["replicas"] == 1
            and "llama-decode" in services
        )

    wait_for(restored, timeout=60, what="the hand edits reverted and the Service re-created")


def test_leaving_replicas_to_an_autoscaler_keeps_the_running_count(
    cluster: Any, namespace: str, op: OperatorProcess
) -> None:
    """autoscaling.mode external or recommend leaves spec.replicas to others. Server-side apply
    resets a field its only manager stops applying (replicas to 1): the live count must stay."""
    doc = sample()
    apply(cluster, doc, namespace)
    wait_ready(cluster, namespace, "llama")
    assert deployments(cluster, namespace)["llama-decode"]["spec"]["replicas"] == 2  # off: min

    def managers(name: str) -> set[str]:
        dep = get(cluster, namespace, "deployment", name, "--show-managed-fields")
        fields = dep["metadata"].get("managedFields") or []
        return {f["manager"] for f in fields if "f:replicas" in (f.get("fieldsV1") or {}).get("f:spec", {})}

    doc["spec"]["autoscaling"] = {"mode": "external"}
    apply(cluster, doc, namespace)
    wait_ready(cluster, namespace, "llama")
    wait_for(
        lambda: "tandem-operator" not in managers("llama-decode"),
        timeout=30,
        what="Tandem to stop applying llama-decode's replicas",
    )
    assert "tandem-replicas-handover" in managers("llama-decode")
    wait_seconds(RESYNC * 3)
    assert deployments(cluster, namespace)["llama-decode"]["spec"]["replicas"] == 2
    cluster.kubectl("scale", "deployment/llama-decode", "--replicas=3", "-n", namespace)  # as an HPA would

    # recommend: the planner reports (here: no Prometheus configured) and changes nothing
    doc["spec"]["autoscaling"] = {"mode": "recommend"}
    apply(cluster, doc, namespace)

    def not_configured() -> dict[str, Any] | None:
        svc = get(cluster, namespace, "tisvc", "llama")
        c = condition(svc, "MetricsAvailable")
        return svc if c and c["reason"] == "PrometheusNotConfigured" else None

    svc = wait_for(not_configured, timeout=30, what="MetricsAvailable=False/PrometheusNotConfigured")
    assert svc["status"]["lastDecision"]["reason"] == "PrometheusNotConfigured"
    wait_seconds(RESYNC * 3)
    assert deployments(cluster, namespace)["llama-decode"]["spec"]["replicas"] == 3

    # off again: Tandem pins every pool to its min and owns the field once more
    doc["spec"]["autoscaling"] = {"mode": "off"}
    apply(cluster, doc, namespace)
    wait_for(
        lambda: deployments(cluster, namespace)["llama-decode"]["spec"]["replicas"] == 2,
        timeout=30,
        what="llama-decode back at its min",
    )
    assert "tandem-operator" in managers("llama-decode")
    svc = wait_ready(cluster, namespace, "llama")
    assert condition(svc, "MetricsAvailable") is None and "lastDecision" not in svc["status"]


def test_unknown_accelerator_pool_is_reported_not_crashed_on(
    cluster: Any, namespace: str, op: OperatorProcess
) -> None:
    pool_name = f"later-{namespace[-5:]}"
    doc = sample()
    doc["spec"]["pools"][1]["acceleratorPool"] = pool_name
    apply(cluster, doc, namespace)

    def not_found() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "tisvc", "llama"), "Ready")
        return c if c and c["reason"] == "AcceleratorPoolNotFound" else None

    c = wait_for(not_found, timeout=60, what="Ready=False AcceleratorPoolNotFound")
    assert c["status"] == "False" and pool_name in c["message"]
    assert deployments(cluster, namespace) == {}, "nothing is rolled out for a half-understood spec"
    wait_for(
        lambda: any(
            e.get("reason") == "AcceleratorPoolNotFound" and e.get("type") == "Warning"
            for e in get(cluster, namespace, "events")["items"]
        ),
        timeout=30,
        what="a Warning Event",
    )
    wait_seconds(RESYNC * 2)
    assert "Traceback" not in op.log_text()
    # the pool appears: the service converges without anyone touching it
    gaudi = yaml.safe_load_all((SAMPLES / "acceleratorpools.yaml").read_text())
    pool = next(p for p in gaudi if p["metadata"]["name"] == "gaudi3")
    pool["metadata"]["name"] = pool_name
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(pool))
    try:
        wait_ready(cluster, namespace, "llama")
    finally:
        cluster.kubectl("delete", "accpool", pool_name, "--wait=false")


def _warning_event(cluster: Any, namespace: str, reason: str) -> bool:
    return any(
        e.get("reason") == reason and e.get("type") == "Warning"
        for e in get(cluster, namespace, "events")["items"]
    )


def test_a_child_the_apiserver_rejects_is_reported_and_retried(
    cluster: Any, namespace: str, op: OperatorProcess
) -> None:
    """An admission policy (here a ValidatingAdmissionPolicy, standing in for Kyverno or
    Gatekeeper) refuses the decode Deployment: Ready=False/ChildRejected with the policy's
    message and a Warning Event, the other children still applied; once the policy goes, the
    resync converges without anyone touching the service."""
    policy = f"no-decode-{namespace[-5:]}"
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["deployments"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "!has(object.metadata.labels) || "
                        "!('inference.tandem.dev/role' in object.metadata.labels) || "
                        "object.metadata.labels['inference.tandem.dev/role'] != 'decode'",
                        "message": "decode workers are not allowed in this namespace",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    try:
        # the apiserver enforces a new policy once its informer has seen it
        probe = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "probe",
                "namespace": namespace,
                "labels": {"inference.tandem.dev/role": "decode"},
            },
            "spec": {
                "selector": {"matchLabels": {"app": "probe"}},
                "template": {
                    "metadata": {"labels": {"app": "probe"}},
                    "spec": {"containers": [{"name": "c", "image": "x"}]},
                },
            },
        }
        wait_for(
            lambda: (
                cluster.kubectl(
                    "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(probe), check=False
                ).returncode
                != 0
            ),
            timeout=30,
            what="the policy to be enforced",
        )
        apply(cluster, sample(), namespace)

        def rejected() -> dict[str, Any] | None:
            c = condition(get(cluster, namespace, "tisvc", "llama"), "Ready")
            return c if c and c["reason"] == "ChildRejected" else None

        c = wait_for(rejected, timeout=60, what="Ready=False ChildRejected")
        assert c["status"] == "False"
        assert "Deployment" in c["message"] and "llama-decode" in c["message"], c["message"]
        assert "decode workers are not allowed in this namespace" in c["message"], c["message"]
        degraded = condition(get(cluster, namespace, "tisvc", "llama"), "Degraded")
        assert degraded and degraded["status"] == "True" and degraded["reason"] == "ChildRejected"
        assert set(deployments(cluster, namespace)) >= {"llama-prefill", "llama-mixed"}
        assert "llama-decode" not in deployments(cluster, namespace)
        wait_for(
            lambda: _warning_event(cluster, namespace, "ChildRejected"), timeout=30, what="a Warning Event"
        )
        assert "Traceback" not in op.log_text()
    finally:
        cluster.kubectl(
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            policy,
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )
    wait_ready(cluster, namespace, "llama")


def test_a_crash_looping_pool_is_degraded(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    """The decode pool's engine never starts (KWOK's pod-crash-loop stage: CrashLoopBackOff):
    Degraded=True/PoolCrashLooping naming the pool and Ready=False; fixing the image recovers.
    (That the planner adds no replicas to a pool whose replicas are not ready is a scenario of
    tests/test_planner.py.)"""
    doc = sample()
    doc["spec"]["pools"][1]["image"] = "registry.invalid/tandem/crash-loop:e2e"
    apply(cluster, doc, namespace)

    # The condition turns True with the first pod that crash-loops; KWOK may take a moment
    # longer with the second, so wait until the message counts both.
    both = "Pool decode: 2 pod(s) with container engine in CrashLoopBackOff"

    def crash_looping() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "tisvc", "llama"), "Degraded")
        if not (c and c["status"] == "True" and c["reason"] == "PoolCrashLooping"):
            return None
        return c if c["message"].startswith(both) else None

    c = wait_for(crash_looping, timeout=60, what=f"Degraded=True PoolCrashLooping with {both!r}")
    assert "the planner adds no replicas to it until they become ready" in c["message"], c
    wait_for(
        lambda: _warning_event(cluster, namespace, "PoolCrashLooping"), timeout=30, what="a Warning Event"
    )
    svc = get(cluster, namespace, "tisvc", "llama")
    ready = condition(svc, "Ready")
    assert ready and ready["status"] == "False" and "decode" in ready["message"]
    assert deployments(cluster, namespace)["llama-decode"]["spec"]["replicas"] == 2
    # fixed image: the rollout replaces the crash-looping pods and the service recovers
    doc["spec"]["pools"][1].pop("image")
    apply(cluster, doc, namespace)
    wait_ready(cluster, namespace, "llama")

    # Ready counts ready replicas; an old ReplicaSet's crash-looping pod may outlive that by a
    # moment until the rollout deletes it, and it is still failing while it runs.
    def recovered() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "tisvc", "llama"), "Degraded")
        return c if c and c["status"] == "False" else None

    degraded = wait_for(recovered, timeout=60, what="Degraded=False after the rollout")
    assert degraded["reason"] == "AsExpected", degraded
