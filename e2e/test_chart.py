"""The Helm chart on the real local cluster: rendered values accepted by the apiserver
(--dry-run=server), one install/upgrade/uninstall cycle, the README's install command, and the
RBAC proof: the real operator, run out of cluster with nothing but the chart's ServiceAccount
token, serves the core scenario; any forbidden call fails the test.

Pods of the fake nodes never run containers (KWOK marks them Ready), so the in-cluster operator
Deployment is only checked as an object; the RBAC test runs the operator process instead.
Release names, peering names and AcceleratorPool names are unique per test, so other suites on
the same cluster are not disturbed; the shared CRDs are never deleted.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.chart import (
    CHART_DIR,
    CI_VALUES_DIR,
    helm,
    helm_binary,
    service_account_kubeconfig,
    template,
)
from e2e.harness.common import REPO_ROOT, STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"
README = REPO_ROOT / "README.md"


def get(cluster: Any, *what: str, namespace: str | None = None, check: bool = True) -> dict[str, Any] | None:
    ns = ["-n", namespace] if namespace else []
    proc = cluster.kubectl("get", *what, *ns, "-o", "json", check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else None  # type: ignore[no-any-return]


def exists(cluster: Any, *what: str, namespace: str | None = None) -> bool:
    return get(cluster, *what, namespace=namespace, check=False) is not None


def can_i(cluster: Any, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    """`kubectl auth can-i` as ``sa`` (a SubjectAccessReview by the real authorizer)."""
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = cluster.kubectl("auth", "can-i", verb, resource, *scope, *extra, f"--as={sa}", check=False)
    return proc.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    install_crds(cluster)


def has_api(cluster: Any, group_version: str) -> bool:
    return group_version in cluster.kubectl("api-versions").stdout.split()


@pytest.mark.parametrize("values", sorted(CI_VALUES_DIR.glob("*-values.yaml")), ids=lambda p: p.stem)
def test_rendered_values_pass_server_dry_run(cluster: Any, namespace: str, crds: None, values: Path) -> None:
    """helm template for each CI values file, validated by the real apiserver (schemas, CEL rules
    of the AcceleratorPool catalog, RBAC objects) without creating anything."""
    overrides = [f"watchNamespaces={{{namespace}}}"] if "namespaced" in values.name else []
    rendered = template(
        f"dry-{namespace[-5:]}", namespace, values_files=[values], set_values=overrides
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    if not has_api(cluster, "monitoring.coreos.com/v1"):  # no prometheus-operator CRDs here
        docs = [d for d in docs if d["kind"] not in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
    assert docs
    proc = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


def test_install_upgrade_uninstall(cluster: Any, namespace: str, crds: None) -> None:
    release = f"t-{namespace[-5:]}"
    pools = [
        {
            "name": f"{release}-h100",
            "spec": {
                "vendor": "nvidia",
                "model": "H100-SXM",
                "nodeSelector": {"inference.tandem.dev/accelerator-model": "H100-SXM"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "devicesPerNode": 8,
            },
        }
    ]
    values = STATE_ROOT / "e2e" / f"{release}-values.yaml"
    values.parent.mkdir(parents=True, exist_ok=True)
    values.write_text(yaml.safe_dump({"peering": {"name": release}, "acceleratorPools": pools}))
    full = f"{release}-tandem"
    sa = f"system:serviceaccount:{namespace}:{full}"

    try:
        out = helm(
            "install",
            release,
            str(CHART_DIR),
            "-n",
            namespace,
            "-f",
            str(values),
            "--wait",
            "--timeout",
            "180s",
        )
        assert "is installed" in out.stdout  # NOTES.txt rendered
        dep = get(cluster, "deployment", full, namespace=namespace)
        assert dep and dep["status"].get("readyReplicas") == 1
        pods = get(cluster, "pods", "-l", f"app.kubernetes.io/instance={release}", namespace=namespace)
        assert pods and [p["spec"]["nodeName"].startswith("cpu-") for p in pods["items"]] == [True]
        assert exists(cluster, "service", f"{full}-metrics", namespace=namespace)
        assert exists(cluster, "acceleratorpool", f"{release}-h100")
        assert exists(cluster, "clusterkopfpeering", release)

        # The ServiceAccount can make exactly the operator's calls, everywhere (all-namespaces mode).
        for verb, resource in [
            ("watch", "inferenceservices.inference.tandem.dev"),
            ("patch", "inferenceservices.inference.tandem.dev/status"),
            ("patch", "deployments.apps"),
            ("create", "deployments.apps"),
            ("delete", "services"),
            ("list", "configmaps"),
            ("create", "events.events.k8s.io"),
            ("list", "pods"),
            ("list", "nodes"),
            ("watch", "acceleratorpools.inference.tandem.dev"),
            ("patch", "acceleratorpools.inference.tandem.dev/status"),
            ("patch", "clusterkopfpeerings.kopf.dev"),
        ]:
            assert can_i(cluster, sa, verb, resource, None), (verb, resource)
        for verb, resource in [
            ("get", "secrets"),
            ("patch", "inferenceservices.inference.tandem.dev"),
            ("delete", "inferenceservices.inference.tandem.dev"),
            ("patch", "acceleratorpools.inference.tandem.dev"),
            ("create", "pods"),
            ("delete", "nodes"),
            ("list", "namespaces"),
            ("update", "deployments.apps"),
        ]:
            assert not can_i(cluster, sa, verb, resource, None), (verb, resource)

        # A changed value rolls the operator: new pod template, new ReplicaSet, old pod replaced.
        old_pods = {p["metadata"]["name"] for p in pods["items"]}
        helm(
            "upgrade", release, str(CHART_DIR), "-n", namespace, "-f", str(values),
            "--set", "resyncSeconds=30", "--wait", "--timeout", "180s",
        )  # fmt: skip
        dep2 = get(cluster, "deployment", full, namespace=namespace)
        assert dep2 and dep2["metadata"]["generation"] > dep["metadata"]["generation"]
        assert "--resync-seconds=30" in dep2["spec"]["template"]["spec"]["containers"][0]["args"]

        def rolled() -> bool:
            now = get(cluster, "pods", "-l", f"app.kubernetes.io/instance={release}", namespace=namespace)
            live = [p for p in (now or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")]
            return bool(live) and not ({p["metadata"]["name"] for p in live} & old_pods)

        wait_for(rolled, timeout=60, what="the operator pod replaced after helm upgrade")
        history = helm("history", release, "-n", namespace, "-o", "json").stdout
        assert [h["status"] for h in json.loads(history)] == ["superseded", "deployed"]

        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
        for what in (
            ["clusterrole", f"{full}-cluster"],
            ["clusterrole", f"{full}-namespaced"],
            ["clusterrolebinding", f"{full}-cluster"],
            ["acceleratorpool", f"{release}-h100"],
            ["clusterkopfpeering", release],
        ):
            assert not exists(cluster, *what), what
        assert not exists(cluster, "deployment", full, namespace=namespace)
        assert exists(cluster, "crd", "inferenceservices.inference.tandem.dev")  # helm never deletes CRDs
    finally:  # cluster-scoped objects outlive the namespace: never leak them
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)


def readme_install_command() -> list[str]:
    """The install command exactly as README.md writes it."""
    found = re.findall(r"helm install tandem charts/tandem[^`\n]*", README.read_text())
    assert found, "README.md shows no `helm install tandem charts/tandem ...` command"
    return shlex.split(found[0])


def test_readme_install_works_as_written(cluster: Any, crds: None) -> None:
    """Runs README.md's `helm install` from the repository root, as a user would; then uninstalls.
    The release name and namespace are the README's, so two runs of this test on one cluster
    serialize on the namespace."""
    args = readme_install_command()
    assert args[:4] == ["helm", "install", "tandem", "charts/tandem"]
    namespace = args[args.index("-n") + 1] if "-n" in args else args[args.index("--namespace") + 1]
    wait_for(
        lambda: not exists(cluster, "namespace", namespace),
        timeout=300,
        what=f"namespace {namespace} gone (another run of this test, or a leftover release)",
    )
    try:
        proc = subprocess.run(
            [str(helm_binary()), *args[1:]],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "is installed" in proc.stdout
        cluster.kubectl("rollout", "status", "deployment/tandem", "-n", namespace, "--timeout=120s")
        dep = get(cluster, "deployment", "tandem", namespace=namespace)
        assert dep and dep["status"].get("readyReplicas") == 1
    finally:
        helm("uninstall", "tandem", "-n", namespace, "--wait", "--timeout", "120s", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)


# ---- the RBAC proof -------------------------------------------------------------------------


def sample_service() -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"]["name"] = "llama"
    return doc  # type: ignore[no-any-return]


def ready(cluster: Any, namespace: str, name: str) -> dict[str, Any] | None:
    svc = get(cluster, "inferenceservice", name, namespace=namespace)
    assert svc is not None
    status = svc.get("status") or {}
    conds = {c["type"]: c for c in status.get("conditions", [])}
    gen = svc["metadata"]["generation"]
    ok = conds.get("Ready", {}).get("status") == "True" and status.get("observedGeneration") == gen
    return svc if ok else None


# a 403 status, not the milliseconds of a log timestamp such as "13:26:53,403"
FORBIDDEN = re.compile(r"(?<![,.])\b403\b|forbidden|Not enough permissions", re.IGNORECASE)


def test_operator_runs_with_only_the_charts_permissions(
    cluster: Any, namespace: str, crds: None, diagnostics: Any
) -> None:
    """Installs the chart watching this namespace, then runs `tandem operator -n <ns>` with a
    kubeconfig holding only the chart ServiceAccount's token through the core scenario: create,
    change (prune a pool), delete. Any 403 from the apiserver, to Tandem or to kopf, fails."""
    release = f"rb-{namespace[-5:]}"
    full = f"{release}-tandem"
    helm(
        "install", release, str(CHART_DIR), "-n", namespace,
        "--set", f"watchNamespaces={{{namespace}}}", "--set", f"peering.name={release}",
        "--wait", "--timeout", "180s",
    )  # fmt: skip
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
        token = cluster.kubectl("create", "token", full, "-n", namespace, "--duration=1h").stdout.strip()
        kubeconfig = service_account_kubeconfig(
            cluster.kubeconfig, token, namespace, STATE_ROOT / "e2e" / f"{release}.kubeconfig"
        )
        sa = f"system:serviceaccount:{namespace}:{full}"
        assert can_i(cluster, sa, "patch", "deployments.apps", namespace)
        assert not can_i(cluster, sa, "patch", "deployments.apps", "default")  # only where it watches
        assert not can_i(cluster, sa, "list", "inferenceservices.inference.tandem.dev", None)

        op = OperatorProcess(
            kubeconfig,
            STATE_ROOT / "e2e" / f"operator-{release}.log",
            namespaces=[namespace],
            resync_seconds=2.0,
            extra_args=["--peering", release],  # the chart's KopfPeering (last flag wins)
        )
        diagnostics.add_log(op.log_path)
        with op:
            doc = sample_service()
            cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
            svc = wait_for(lambda: ready(cluster, namespace, "llama"), timeout=120, what="llama Ready")
            assert svc["status"]["ratio"] == "1:2"
            deps = get(
                cluster, "deployments", "-l", "inference.tandem.dev/service=llama", namespace=namespace
            )
            assert deps and {d["metadata"]["name"] for d in deps["items"]} == {
                "llama-prefill",
                "llama-decode",
                "llama-mixed",
                "llama-router",
            }
            events = get(cluster, "events.events.k8s.io", namespace=namespace)
            assert events and any(e.get("reason") == "Applied" for e in events["items"])

            # change: drop the mixed pool -> the operator prunes its Deployment and Service (DELETE)
            doc["spec"]["pools"] = [p for p in doc["spec"]["pools"] if p["role"] != "mixed"]
            cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
            wait_for(
                lambda: (
                    ready(cluster, namespace, "llama")
                    and not exists(cluster, "deployment", "llama-mixed", namespace=namespace)
                ),
                timeout=120,
                what="llama-mixed pruned and llama Ready",
            )
            cluster.kubectl("delete", "inferenceservice", "llama", "-n", namespace, "--wait=true")
            # one more status resync (node and pod lists, pool statuses) after the changes
            seen = op.reconciles()
            cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
            wait_for(lambda: op.reconciles() > seen + 1, timeout=60, what="two more reconciles")
            metrics = op.metrics()
            log_text = op.log_text()
        verbs = {
            k.split("verb=")[1].split(",")[0].rstrip("}") for k, v in metrics.items() if "verb=" in k and v
        }
        assert {"GET", "PATCH", "POST", "DELETE"} <= verbs, verbs
        # the chart's CRDs, read with the chart's permissions, are what this operator generates
        crds = {k: v for k, v in metrics.items() if k.startswith("tandem_crd_missing_fields{")}
        assert crds == {
            "tandem_crd_missing_fields{crd=acceleratorpools.inference.tandem.dev}": 0.0,
            "tandem_crd_missing_fields{crd=inferenceservices.inference.tandem.dev}": 0.0,
        }, crds
        bad = [line for line in log_text.splitlines() if FORBIDDEN.search(line)]
        assert not bad, "forbidden calls:\n" + "\n".join(bad[:20])
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
