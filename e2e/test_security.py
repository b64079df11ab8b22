"""Least privilege, on the real apiserver.

* The operator pod passes the restricted Pod Security Standard: the chart installs into a namespace
  labelled ``pod-security.kubernetes.io/enforce=restricted`` and its pod is admitted and Ready.
* Worker pods need nothing beyond the baseline standard but ``IPC_LOCK`` (pinned memory for the KV
  transfer, worker-images/kv-sidecar/README.md): their pod templates, as Tandem's builders render
  them, are checked by the apiserver's own PodSecurity admission (server dry run).
* The chart's RBAC is the minimum: the operator runs through the core scenario on a side cluster
  whose apiserver keeps an audit log (e2e/harness/faults.py), with only the chart
  ServiceAccount's token; every (group, resource, verb) the ClusterRoles grant must appear in the
  audit log (or be what the operator grants the router's Role, which RBAC requires it to hold).
* No Secret is ever read (no request on ``secrets`` in the audit log) or logged (a canary
  value referenced by a worker's env never appears in the operator's log).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness import gie
from e2e.harness.chart import CHART_DIR, helm, service_account_kubeconfig
from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.faults import SideCluster, side_cluster
from e2e.harness.operator import OperatorProcess, install_crds
from tandem.builders import ServiceContext, desired_objects
from tandem.models import InferenceServiceSpec
from tandem.planner import base_replicas
from tandem.resolve import resolve

SAMPLES = Path(__file__).parent / "samples"
PSS = "pod-security.kubernetes.io"
CANARY = "tandem-canary-5f0c9e1d"


def label(cluster: Any, namespace: str, **labels: str) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "--overwrite", *[f"{PSS}/{k}={v}" for k, v in labels.items()]
    )


def test_operator_pod_passes_the_restricted_pod_security_standard(cluster: Any, namespace: str) -> None:
    install_crds(cluster)
    label(cluster, namespace, enforce="restricted", warn="restricted")
    release = f"pss-{namespace[-5:]}"
    try:
        out = helm(
            "install", release, str(CHART_DIR), "-n", namespace,
            "--set", f"watchNamespaces={{{namespace}}}", "--set", f"peering.name={release}",
            "--wait", "--timeout", "180s",
        )  # fmt: skip
        assert "would violate PodSecurity" not in out.stderr, out.stderr
        dep = json.loads(
            cluster.kubectl("get", "deployment", f"{release}-tandem", "-n", namespace, "-o", "json").stdout
        )
        assert dep["status"].get("readyReplicas") == 1
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)


def worker_pods(namespace: str) -> list[dict[str, Any]]:
    """Pods as the worker Deployments would create them, for every role, with the KV sidecar."""
    pools = {
        d["metadata"]["name"]: d["spec"]
        for d in yaml.safe_load_all((SAMPLES / "acceleratorpools.yaml").read_text())
    }
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    spec = InferenceServiceSpec.model_validate({**doc["spec"], "engine": "vllm"})
    ctx = ServiceContext(
        name="llama",
        namespace=namespace,
        uid="x",
        spec=spec,
        accelerator_pools=resolve(spec, pools).accelerator_pools,
        replicas=base_replicas(spec, {}),
    )
    pods = []
    for obj in desired_objects(ctx):
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            meta = {"name": obj["metadata"]["name"], "labels": template["metadata"].get("labels", {})}
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
    assert len(pods) == 4
    return pods


def test_worker_pods_need_only_ipc_lock_beyond_baseline(cluster: Any, namespace: str) -> None:
    label(cluster, namespace, enforce="baseline")
    cluster.kubectl("create", "serviceaccount", "llama-router", "-n", namespace)  # the router's own
    violations: dict[str, str] = {}
    for pod in worker_pods(namespace):
        proc = cluster.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod), check=False
        )
        if proc.returncode != 0:
            violations[pod["metadata"]["name"]] = proc.stderr
    # the router passes baseline as is; each worker fails it only for IPC_LOCK
    assert "llama-router" not in violations
    assert set(violations) == {"llama-prefill", "llama-decode", "llama-mixed"}, violations
    for name, err in violations.items():
        reasons = re.findall(r'violates PodSecurity "baseline:latest": (.*)', err)
        assert reasons, err
        assert (
            reasons[0].strip()
            == 'non-default capabilities (container "kv-sidecar" must not include "IPC_LOCK" in '
            "securityContext.capabilities.add)"
        ), (name, err)


# ---- RBAC and Secrets, from the audit log of a side cluster -------------------------------------


@pytest.fixture(scope="module")
def side(request: pytest.FixtureRequest) -> Iterator[SideCluster]:
    yield side_cluster(request.config)


def granted(cluster: Any, role: str) -> set[tuple[str, str, str]]:
    rules = json.loads(cluster.kubectl("get", "clusterrole", role, "-o", "json").stdout)["rules"]
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def used(events: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for e in events:
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        code = (e.get("responseStatus") or {}).get("code", 0)
        if code == 403:
            continue
        out.add((ref.get("apiGroup", ""), resource, e["verb"]))
        if e["verb"] == "patch" and code == 201:  # a server-side apply that created the object
            out.add((ref.get("apiGroup", ""), resource, "create"))
    return out


# Granted but not exercised by the scenario, each with the path that needs it.
UNEXERCISED = {
    # kopf posts a core/v1 Warning Event when a handler raises; Tandem's handlers catch their own
    # errors (and post events.k8s.io Events), so only an operator bug reaches it.
    ("", "events", "create"),
}


def stale_children(cluster: Any, namespace: str, service: str) -> list[tuple[str, str]]:
    """Creates a ConfigMap, ServiceAccount, Role and RoleBinding owned and labelled as children of
    ``service`` but not desired by it; returns their (kind, name)."""
    cm = json.loads(
        cluster.kubectl("get", "configmap", f"{service}-router", "-n", namespace, "-o", "json").stdout
    )
    meta = {
        "name": f"{service}-stale",
        "labels": cm["metadata"]["labels"],
        "ownerReferences": cm["metadata"]["ownerReferences"],
    }
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"stale": "old version"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": []},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": meta["name"], "namespace": namespace}],
        },
    ]
    docs = json.loads(json.dumps(docs))  # no shared dicts: PyYAML would write anchors across documents
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert proc.returncode == 0, proc.stderr
    return [(d["kind"].lower(), meta["name"]) for d in docs]


def test_rbac_is_exactly_what_the_operator_uses_and_no_secret_is_touched(
    side: SideCluster, diagnostics: Any
) -> None:
    cluster = side.cluster
    assert cluster is not None
    install_crds(cluster)
    # the Gateway API Inference Extension's InferencePool API: the operator owns one per role
    gie.install(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    ns, release = "rbac-audit", "rbac"
    cluster.kubectl("create", "namespace", ns, check=False)
    wait_for(lambda: "default" in cluster.kubectl("get", "sa", "-n", ns, "-o", "name").stdout, timeout=30)
    full = f"{release}-tandem"
    sa = f"system:serviceaccount:{ns}:{full}"
    helm(
        "install", release, str(CHART_DIR), "-n", ns, "--set", f"watchNamespaces={{{ns}}}",
        "--set", f"peering.name={release}", "--wait", "--timeout", "180s", kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    try:
        cluster.kubectl(
            "create", "secret", "generic", "hf-token", "-n", ns, f"--from-literal=token={CANARY}", check=False
        )
        token = cluster.kubectl("create", "token", full, "-n", ns, "--duration=1h").stdout.strip()
        kubeconfig = service_account_kubeconfig(
            cluster.kubeconfig, token, ns, STATE_ROOT / "e2e" / "audit.kubeconfig"
        )
        op = OperatorProcess(
            kubeconfig, STATE_ROOT / "e2e" / "operator-rbac-audit.log", namespaces=[ns], resync_seconds=2.0,
            extra_args=["--peering", release],
        )  # fmt: skip
        diagnostics.add_log(op.log_path)
        doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
        doc["metadata"] = {"name": "llama"}
        secret_env = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
        doc["spec"]["pools"][1]["env"] = [secret_env]
        broken = {**doc, "metadata": {"name": "broken"}}
        broken["spec"] = {**doc["spec"], "pools": [{"name": "m", "role": "mixed", "acceleratorPool": "nope"}]}

        def apply(d: dict[str, Any]) -> None:
            cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=yaml.safe_dump(d))

        def ready(name: str, want: str = "True") -> bool:
            svc = json.loads(cluster.kubectl("get", "tisvc", name, "-n", ns, "-o", "json").stdout)
            st = svc.get("status") or {}
            conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
            return (
                conds.get("Ready") == want and st.get("observedGeneration") == svc["metadata"]["generation"]
            )

        with op:
            apply(doc)
            apply(broken)  # the error path: Ready=False, a Warning Event
            wait_for(lambda: ready("llama") and ready("broken", "False"), timeout=180, what="both reconciled")
            # children left by an older version (owned, labelled, no longer desired): pruned,
            # which is what the delete verbs on the router's kinds are for
            stale = stale_children(cluster, ns, "llama")
            wait_for(
                lambda: all(
                    cluster.kubectl("get", kind, name, "-n", ns, check=False).returncode != 0
                    for kind, name in stale
                ),
                timeout=120,
                what="stale children pruned",
            )
            doc["spec"]["pools"] = [p for p in doc["spec"]["pools"] if p["role"] != "mixed"]
            apply(doc)
            wait_for(
                lambda: (
                    ready("llama")
                    and cluster.kubectl("get", "deployment", "llama-mixed", "-n", ns, check=False).returncode
                    != 0
                ),
                timeout=120,
                what="mixed pool pruned",
            )
            # one InferencePool per role left (the mixed one pruned with its pool)
            wait_for(
                lambda: sorted(
                    cluster.kubectl("get", "inferencepools", "-n", ns, "-o", "name").stdout.split()
                )
                == ["inferencepool.inference.networking.k8s.io/llama-decode",
                    "inferencepool.inference.networking.k8s.io/llama-prefill"],
                timeout=120,
                what="InferencePools per remaining role",
            )  # fmt: skip
            router_roles = json.loads(cluster.kubectl("get", "roles", "-n", ns, "-o", "json").stdout)["items"]
            cluster.kubectl("delete", "tisvc", "llama", "broken", "-n", ns, "--wait=true", "--timeout=60s")
            log_text = op.log_text()
        events = side.audit_events(sa)
        assert events, "no audit events for the operator's ServiceAccount"
        forbidden = [e for e in events if (e.get("responseStatus") or {}).get("code") == 403]
        assert not forbidden, [(e["verb"], e.get("objectRef")) for e in forbidden][:10]
        calls = used(events)
        assert not [c for c in calls if c[1].startswith("secrets")], "the operator touched a Secret"
        assert CANARY not in log_text
        # what the operator grants the router's Role, RBAC requires it to hold
        delegated = {
            (g, r, v) for role in router_roles for rule in role.get("rules", [])
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }  # fmt: skip
        grants = granted(cluster, f"{full}-cluster") | granted(cluster, f"{full}-namespaced")
        extra = sorted(grants - calls - delegated - UNEXERCISED)
        report = {"used": sorted(calls), "granted": sorted(grants), "extra": extra}
        (STATE_ROOT / "e2e" / "rbac-audit.json").write_text(json.dumps(report, indent=2))
        assert not extra, f"granted but never used: {extra}"
    finally:
        helm(
            "uninstall",
            release,
            "-n",
            ns,
            "--wait",
            "--timeout",
            "120s",
            check=False,
            kubeconfig=cluster.kubeconfig,
        )
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
