"""Gateway API Inference Extension interop: where the InferencePool API is served, the operator owns
one InferencePool per role of an InferenceService (so a GIE gateway, an llm-d router for one, can
route to the pools), follows the service's settings, and removes them when told to.

The InferencePool CRD here is a stand-in with upstream's group, version and names
(e2e/crds/); it is installed for this module only and removed after it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"
GIE_CRD = Path(__file__).parent / "crds" / "inferencepools.inference.networking.k8s.io.yaml"
ROLE = "inference.tandem.dev/role"


@pytest.fixture(scope="module")
def gie_api(cluster: Any) -> Iterator[None]:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    cluster.kubectl("apply", "--server-side", "-f", str(GIE_CRD))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", "-f", str(GIE_CRD))
    yield
    cluster.kubectl("delete", "-f", str(GIE_CRD), "--wait=false", check=False)


def pools(cluster: Any, namespace: str) -> dict[str, dict[str, Any]]:
    out = cluster.kubectl("get", "inferencepools", "-n", namespace, "-o", "json").stdout
    return {p["metadata"]["name"]: p for p in json.loads(out)["items"]}


def test_inference_pools_per_role_follow_the_service(
    cluster: Any, namespace: str, gie_api: None, diagnostics: Any
) -> None:
    op = OperatorProcess(
        cluster.kubeconfig,
        STATE_ROOT / "e2e" / f"operator-{namespace}.log",
        namespaces=[namespace],
        standalone=True,
        resync_seconds=5,
    )
    diagnostics.add_log(op.log_path)
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"] = {"name": "llama"}

    def apply(d: dict[str, Any]) -> None:
        cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(d))

    with op:
        apply(doc)
        names = ["llama-decode", "llama-mixed", "llama-prefill"]
        wait_for(
            lambda: sorted(pools(cluster, namespace)) == names, timeout=90, what="one InferencePool per role"
        )
        svc = json.loads(cluster.kubectl("get", "tisvc", "llama", "-n", namespace, "-o", "json").stdout)
        for name, pool in pools(cluster, namespace).items():
            role = name.removeprefix("llama-")
            spec = pool["spec"]
            assert spec["selector"]["matchLabels"] == {"inference.tandem.dev/service": "llama", ROLE: role}
            assert spec["targetPorts"] == [{"number": 8000}]
            assert spec["endpointPickerRef"] == {
                "group": "",
                "kind": "Service",
                "name": "llama-epp",
                "portNumber": 9002,
                "failureMode": "FailClose",
            }
            (owner,) = pool["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"], owner.get("controller")) == (
                "InferenceService",
                svc["metadata"]["uid"],
                True,
            )
            # the selector finds exactly the pods of that role
            pods = cluster.kubectl(
                "get", "pods", "-n", namespace, "-l",
                ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items()), "-o", "json",
            ).stdout  # fmt: skip
            assert {p["metadata"]["labels"][ROLE] for p in json.loads(pods)["items"]} == {role}

        # the service's settings reach them
        doc["spec"]["routing"] = {"inferencePool": {"endpointPicker": "llm-d-epp", "failureMode": "FailOpen"}}
        apply(doc)
        wait_for(
            lambda: (
                {
                    (p["spec"]["endpointPickerRef"]["name"], p["spec"]["endpointPickerRef"]["failureMode"])
                    for p in pools(cluster, namespace).values()
                }
                == {("llm-d-epp", "FailOpen")}
            ),
            timeout=60,
            what="the Endpoint Picker settings applied",
        )

        # mode off: the operator removes the ones it made
        doc["spec"]["routing"] = {"inferencePool": {"mode": "off"}}
        apply(doc)
        wait_for(lambda: not pools(cluster, namespace), timeout=60, what="InferencePools removed")
