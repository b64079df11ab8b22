"""The Helm chart without a cluster: helm lint, the values schema, rendered objects (security
settings, probes, RBAC rules, watch scope), documentation of every value, and the CRD copy.

Runs the helm v3 binary tools/build.sh builds. The cluster-side tests (server dry-run, install,
upgrade, uninstall, the RBAC proof) are in e2e/test_chart.py.
"""

from __future__ import annotations

import sys
from pathlib import Path as _Path

# e2e/harness/chart.py (helm, Lua runner) is shared with the e2e suite; `pytest tests` does not
# put the repository root on sys.path by itself.
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import chart
from e2e.harness.chart import CHART_DIR, CI_VALUES_DIR, find, helm, render

import tandem
from tandem.models import crdgen

ROOT = Path(__file__).resolve().parents[1]
CI_VALUES = sorted(CI_VALUES_DIR.glob("*-values.yaml"))

# What the operator calls (operator/tandem/kube.py, controller.py, reconcile.py) and what kopf
# needs (watches, peering, CRD and namespace observation, event posting): (apiGroup, resource) ->
# verbs. The e2e RBAC test proves these suffice by running the operator with this ServiceAccount.
CLUSTER_RULES = {
    ("inference.tandem.dev", "acceleratorpools"): {"list", "watch"},
    ("inference.tandem.dev", "acceleratorpools/status"): {"patch"},
    ("", "nodes"): {"list"},
    ("", "pods"): {"list"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
CLUSTERWIDE_ONLY = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}}
NAMESPACE_LIST_ONLY = {("", "namespaces"): {"list", "watch"}}
NAMESPACED_RULES = {
    ("inference.tandem.dev", "inferenceservices"): {"list", "watch"},
    ("inference.tandem.dev", "inferenceservices/status"): {"patch"},
    ("apps", "deployments"): {"list", "watch", "create", "patch", "delete"},
    ("", "services"): {"list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"list", "create", "patch", "delete"},
    ("", "serviceaccounts"): {"list", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"list", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"list", "create", "patch", "delete"},
    ("inference.networking.k8s.io", "inferencepools"): {"list", "create", "patch", "delete"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("events.k8s.io", "events"): {"create"},
    ("", "events"): {"create"},
}
NAMESPACED_LIST_ONLY = {("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                assert key not in out, f"{key} appears in two rules of {role['metadata']['name']}"
                out[key] = set(rule["verbs"])
    return out


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = find(docs, "Deployment")
    return dep


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_chart_version_matches_operator() -> None:
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == tandem.__version__


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint_is_clean(values: Path | None) -> None:
    args = ["lint", str(CHART_DIR), "--strict"] + (["-f", str(values)] if values else [])
    proc = helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("imagee.tag=1", "additional properties 'imagee'"),
        ("image.tagg=1", "additional properties 'tagg'"),
        ("metrics.serviceMonitor.intervall=1m", "additional properties 'intervall'"),
        ("peering.nmae=x", "additional properties 'nmae'"),
        ("replicaCount=-1", "replicaCount"),
        ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
    ],
)
def test_schema_rejects_unknown_and_invalid_values(setting: str, where: str) -> None:
    proc = chart.template(set_values=[setting], check=False)
    assert proc.returncode != 0
    assert where in proc.stderr, proc.stderr


def test_schema_describes_every_value_and_only_those() -> None:
    """values.yaml and values.schema.json list the same keys, and every schema object that is not a
    free-form map rejects unknown keys."""
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if "properties" not in node:
            return  # a free-form map (labels, resources, a pool spec, ...)
        assert node.get("additionalProperties") is False, f"{path or '.'} accepts unknown keys"
        assert isinstance(value, dict), path
        assert set(value) == set(node["properties"]) - {"global"}, path
        for key, sub in node["properties"].items():
            if key in value:
                walk(value[key], sub, f"{path}.{key}")

    walk(values, schema, "")


def test_every_value_is_documented() -> None:
    """`helm show values` is the documentation: every key has a comment right above it, except keys
    inside a value documented as a whole (a `# --` comment on its parent, e.g. resources)."""
    shown = helm("show", "values", str(CHART_DIR)).stdout
    assert shown.rstrip() == (CHART_DIR / "values.yaml").read_text().rstrip()
    lines = shown.splitlines()
    undocumented = []
    whole: list[int] = []  # indents of enclosing keys documented as a whole
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        whole = [w for w in whole if w < indent]
        previous = lines[i - 1].strip() if i else ""
        if not whole and not previous.startswith("#"):
            undocumented.append(line.strip())
        if previous.startswith("# --") or (
            previous.startswith("#") and _comment_block_starts_with_dash(lines, i)
        ):
            whole.append(indent)
    assert not undocumented, f"values without a comment: {undocumented}"


def _comment_block_starts_with_dash(lines: list[str], i: int) -> bool:
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("#"):
        j -= 1
    return lines[j + 1].strip().startswith("# --")


def test_values_are_camel_case() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    keys = re.findall(r"^ *([A-Za-z0-9_-]+):", text, re.M)
    bad = [k for k in keys if not re.fullmatch(r"[a-z][A-Za-z0-9]*", k) and "/" not in k and "." not in k]
    assert not bad, bad


def test_operator_pod_is_locked_down() -> None:
    docs = render()
    pod = deployment(docs)["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # read-only root: a writable /tmp
    assert pod["serviceAccountName"] == "tandem"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_probes_hit_kopfs_health_endpoint() -> None:
    c = container(render())
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--metrics-port={ports['metrics']}" in c["args"]
    (svc,) = find(render(), "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"] == deployment(render())["spec"]["selector"]["matchLabels"]


def test_image_tags_default_to_app_version() -> None:
    c = container(render())
    assert c["image"] == f"ghcr.io/tandem-dev/operator:{tandem.__version__}"
    assert f"--image-tag={tandem.__version__}" in c["args"]
    assert "--image-registry=ghcr.io/tandem-dev" in c["args"]
    pinned = container(render(set_values=["image.tag=9.9.9", "workerImages.tag=8.8.8"]))
    assert pinned["image"].endswith(":9.9.9") and "--image-tag=8.8.8" in pinned["args"]
    digest = "sha256:" + "ab" * 32
    assert container(render(set_values=[f"image.digest={digest}"]))["image"].endswith("@" + digest)


def test_all_namespaces_by_default() -> None:
    docs = render()
    args = container(docs)["args"]
    assert args[:2] == ["operator", "--all-namespaces"] and "--peering=tandem" in args
    assert "--probe-kv-sidecars" in args  # in-cluster, the operator can reach the sidecars
    assert not any(a.startswith("--namespace") for a in args)
    roles = {r["metadata"]["name"]: rules_of(r) for r in find(docs, "ClusterRole")}
    assert roles == {
        "tandem-cluster": {**CLUSTER_RULES, **CLUSTERWIDE_ONLY},
        "tandem-namespaced": NAMESPACED_RULES,
    }
    bindings = {b["metadata"]["name"]: b for b in find(docs, "ClusterRoleBinding")}
    assert set(bindings) == {"tandem-cluster", "tandem-namespaced"}
    for name, b in bindings.items():
        assert b["roleRef"]["name"] == name
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "tandem", "namespace": "tandem-system"}]
    assert not find(docs, "RoleBinding") and not find(docs, "Role")
    assert [p["metadata"]["name"] for p in find(docs, "ClusterKopfPeering")] == ["tandem"]


def test_namespace_list_mode() -> None:
    docs = render(values_files=[CI_VALUES_DIR / "namespaced-values.yaml"])
    args = container(docs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--peering=tandem-teams" in args
    roles = {r["metadata"]["name"]: rules_of(r) for r in find(docs, "ClusterRole")}
    assert roles == {
        "tandem-cluster": {**CLUSTER_RULES, **NAMESPACE_LIST_ONLY},
        "tandem-namespaced": {**NAMESPACED_RULES, **NAMESPACED_LIST_ONLY},
    }
    # cluster-scoped reads stay cluster-wide; namespaced permissions only in the listed namespaces
    assert [b["metadata"]["name"] for b in find(docs, "ClusterRoleBinding")] == ["tandem-cluster"]
    rbs = find(docs, "RoleBinding")
    assert sorted(rb["metadata"]["namespace"] for rb in rbs) == ["team-a", "team-b"]
    assert all(
        rb["roleRef"]
        == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tandem-namespaced"}
        for rb in rbs
    )
    peerings = find(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "tandem-teams"),
        ("team-b", "tandem-teams"),
    ]
    assert not find(docs, "ClusterKopfPeering")
    assert deployment(docs)["spec"]["replicas"] == 2


def test_rbac_is_least_privilege() -> None:
    """No wildcards, no secrets, nothing written but children, statuses and events."""
    for values in CI_VALUES:
        for role in find(render(values_files=[values]), "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert "secrets" not in rule["resources"]
                assert not {"update", "deletecollection", "escalate", "bind", "impersonate"} & set(
                    rule["verbs"]
                )
            writable = {k for k, v in rules_of(role).items() if v & {"create", "patch", "delete"}}
            assert writable <= {
                ("inference.tandem.dev", "acceleratorpools/status"),
                ("inference.tandem.dev", "inferenceservices/status"),
                ("apps", "deployments"),
                ("", "services"),
                ("", "configmaps"),
                # one PodDisruptionBudget per pool
                ("policy", "poddisruptionbudgets"),
                # the router's identity: a ServiceAccount with a Role to read EndpointSlices
                ("", "serviceaccounts"),
                ("rbac.authorization.k8s.io", "roles"),
                ("rbac.authorization.k8s.io", "rolebindings"),
                # Gateway API Inference Extension interop: one InferencePool per role
                ("inference.networking.k8s.io", "inferencepools"),
                ("events.k8s.io", "events"),
                ("", "events"),
                ("kopf.dev", "clusterkopfpeerings"),
                ("kopf.dev", "kopfpeerings"),
            }


def test_full_values_render_everything() -> None:
    docs = render(values_files=[CI_VALUES_DIR / "full-values.yaml"])
    c = container(docs)
    assert c["image"].startswith("registry.example.com/tandem/operator@sha256:")
    assert "--standalone" in c["args"] and not any(a.startswith("--peering") for a in c["args"])
    assert "--image-registry=registry.example.com/tandem" in c["args"] and "--verbose" in c["args"]
    assert {"name": "TZ", "value": "UTC"} in c["env"]
    assert not find(docs, "ClusterKopfPeering")  # standalone: no peering object
    (sm,) = find(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["interval"] == "15s"
    # the operator's series name the InferenceService in namespace/service: keep them
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    (rule,) = find(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    (pm,) = find(docs, "PodMonitor")  # tests/test_pod_monitor.py checks what it selects and labels
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "10s"
    pools = {p["metadata"]["name"]: p for p in find(docs, "AcceleratorPool")}
    assert set(pools) == {"ci-h100", "ci-mi300x"}
    assert pools["ci-h100"]["spec"]["vendor"] == "nvidia"
    assert pools["ci-h100"]["metadata"]["labels"]["example.com/site"] == "lab"
    assert all(d["metadata"]["name"].startswith("tandem-full") for d in find(docs, "ClusterRole"))


def test_service_monitor_needs_the_service() -> None:
    proc = chart.template(
        set_values=["metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"], check=False
    )
    assert proc.returncode != 0 and "needs metrics.service.enabled" in proc.stderr


def test_no_rbac_no_service_account() -> None:
    docs = render(set_values=["rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops"])
    assert not find(docs, "ClusterRole") and not find(docs, "ServiceAccount")
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_chart_crds_are_the_generated_ones() -> None:
    """charts/tandem/crds is what `make crds` writes: the generated CRDs and a copy of kopf's."""
    assert crdgen.main(["--check", "--out", str(ROOT / "crds"), "--out", str(CHART_DIR / "crds")]) == 0
    assert sorted(p.name for p in (CHART_DIR / "crds").iterdir()) == sorted(
        p.name for p in (ROOT / "crds").glob("*.yaml")
    )


def test_crd_drift_is_detected(tmp_path: Path) -> None:
    """--check fails on a changed copy and on a stale file; a write repairs both."""
    source, copy = tmp_path / "crds", tmp_path / "chart-crds"
    assert crdgen.main(["--out", str(source)]) == 0
    (source / "kopf.dev_peerings.yaml").write_text((ROOT / "crds" / "kopf.dev_peerings.yaml").read_text())
    assert crdgen.main(["--out", str(source), "--out", str(copy)]) == 0
    assert (copy / "kopf.dev_peerings.yaml").read_text() == (source / "kopf.dev_peerings.yaml").read_text()
    assert crdgen.main(["--check", "--out", str(source), "--out", str(copy)]) == 0
    (copy / "kopf.dev_peerings.yaml").write_text("# edited by hand\n")
    (copy / "old.yaml").write_text("stale: true\n")
    assert crdgen.main(["--check", "--out", str(source), "--out", str(copy)]) == 1
    assert crdgen.main(["--out", str(source), "--out", str(copy)]) == 0
    assert not (copy / "old.yaml").exists()
    assert crdgen.main(["--check", "--out", str(source), "--out", str(copy)]) == 0
