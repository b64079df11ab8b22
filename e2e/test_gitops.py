"""GitOps behaviour: a manifest applied twice, client-side or server-side, shows no diff once the
operator has reconciled (no defaulting drift, status never in spec, replicas owned by the operator
on its Deployments, not by the manifest), and the Argo CD health check reads the live object.

Each test runs its own operator (`tandem operator -n <its namespace> --standalone`), so it neither
depends on nor disturbs operators of other suites.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.chart import ARGOCD_HEALTH, argocd_health
from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"


def manifest(namespace: str) -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"] = {"name": "gitops", "namespace": namespace}
    # a pool that leaves tensorParallelSize and replicas to their defaults: a schema default
    # inside the pools list would make the live list differ from this manifest on every apply
    for key in ("tensorParallelSize", "replicas"):
        doc["spec"]["pools"][-1].pop(key)
    return doc  # type: ignore[no-any-return]


def get(cluster: Any, namespace: str, *what: str) -> dict[str, Any]:
    # managedFields are part of what these tests check; kubectl hides them unless asked
    out = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", "--show-managed-fields").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def ready(cluster: Any, namespace: str) -> dict[str, Any] | None:
    svc = get(cluster, namespace, "inferenceservice", "gitops")
    status = svc.get("status") or {}
    conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
    ok = conds.get("Ready") == "True" and status.get("observedGeneration") == svc["metadata"]["generation"]
    return svc if ok else None


@pytest.mark.parametrize("mode", ["server-side", "client-side"])
def test_reapplied_manifest_shows_no_diff(cluster: Any, namespace: str, diagnostics: Any, mode: str) -> None:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    path = STATE_ROOT / "e2e" / f"gitops-{namespace}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest(namespace)))
    flags = ["--server-side"] if mode == "server-side" else []

    op = OperatorProcess.for_namespace(cluster, namespace, resync_seconds=1.0)
    diagnostics.add_log(op.log_path)
    with op:
        cluster.kubectl("apply", *flags, "-f", str(path))
        svc = wait_for(lambda: ready(cluster, namespace), timeout=120, what="InferenceService Ready")
        generation = svc["metadata"]["generation"]
        # let the operator finish: two more full reconciles (resyncs) after Ready
        seen = op.reconciles()
        wait_for(lambda: op.reconciles() >= seen + 2, timeout=60, what="two resync reconciles")

        # the second apply changes nothing, and diff is empty
        second = cluster.kubectl("apply", *flags, "-f", str(path)).stdout
        if mode == "client-side":
            assert "unchanged" in second, second
        diff = cluster.kubectl("diff", *flags, "-f", str(path), check=False)
        assert diff.returncode == 0 and diff.stdout == "", diff.stdout + diff.stderr
        seen = op.reconciles()
        wait_for(lambda: op.reconciles() >= seen + 2, timeout=60, what="two more resync reconciles")
        diff = cluster.kubectl("diff", *flags, "-f", str(path), check=False)
        assert diff.returncode == 0 and diff.stdout == "", diff.stdout + diff.stderr

        live = get(cluster, namespace, "inferenceservice", "gitops")
        assert live["metadata"]["generation"] == generation  # nobody rewrote the spec
        assert "status" not in live["spec"]
        for pool in live["spec"]["pools"]:
            assert "currentReplicas" not in pool and "status" not in pool
        # the operator writes only the status subresource of the user's object, and adds nothing
        # to its metadata (no finalizers, no kopf annotations)
        for entry in live["metadata"]["managedFields"]:
            if not entry["manager"].startswith("kubectl"):
                assert entry.get("subresource") == "status", entry
        assert not live["metadata"].get("finalizers")
        assert not any("kopf" in k for k in (live["metadata"].get("annotations") or {}))
        # replicas belong to the operator's Deployments, managed by its field manager
        deps = get(cluster, namespace, "deployments", "-l", "inference.tandem.dev/service=gitops")["items"]
        assert deps
        for dep in deps:
            owners = [
                e["manager"]
                for e in dep["metadata"]["managedFields"]
                if "f:replicas" in json.dumps(e.get("fieldsV1", {}))
            ]
            assert "tandem-operator" in owners, (dep["metadata"]["name"], owners)

        lua = shutil.which("lua5.1")
        if lua:
            status, message = argocd_health(lua, ARGOCD_HEALTH["InferenceService"], live)
            assert status == "Healthy", message
