"""Gateway API Inference Extension interop: where the InferencePool API is served, the operator owns
one InferencePool per role of an InferenceService (so a GIE gateway, an llm-d router for one, can
route to the pools), follows the service's settings, reports it in ``InferencePoolsEmitted``, and
removes them when told to.

The InferencePool CRD is Tandem's stand-in (e2e/crds/, installed and removed by
``e2e.harness.gie``) unless the cluster already has the upstream CRD: the tests then run against
that one, except the one that needs the API absent first, which is skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness import gie
from e2e.harness.common import wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"
SERVICE = "inference.tandem.dev/service"
ROLE = "inference.tandem.dev/role"
ROLES = ("decode", "mixed", "prefill")
RESYNC = 3.0  # the operator re-reads API discovery once per resync period


@pytest.fixture(scope="module")
def tandem_api(cluster: Any) -> None:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))


@pytest.fixture
def operator(cluster: Any, namespace: str, tandem_api: None, diagnostics: Any) -> Iterator[OperatorProcess]:
    op = OperatorProcess.for_namespace(cluster, namespace, resync_seconds=RESYNC)
    diagnostics.add_log(op.log_path)
    with op:
        yield op


@pytest.fixture
def gie_api(cluster: Any) -> Iterator[None]:
    """The InferencePool API served for the test (the stand-in removed afterwards)."""
    gie.install(cluster)
    yield
    gie.remove(cluster)


@pytest.fixture
def no_gie_api(cluster: Any) -> Iterator[None]:
    """No InferencePool API at the start of the test (the stand-in removed afterwards too)."""
    crd = gie.installed(cluster)
    if crd is not None and not gie.is_stand_in(crd):
        pytest.skip("the cluster has the upstream InferencePool CRD; this test needs the API absent")
    gie.remove(cluster)
    wait_for(lambda: not gie.served(cluster), timeout=60, what="the InferencePool API no longer served")
    yield
    gie.remove(cluster)


def service_doc() -> dict[str, Any]:
    doc = yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
    doc["metadata"] = {"name": "llama"}
    return doc  # type: ignore[no-any-return]


def apply(cluster: Any, namespace: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get_json(cluster: Any, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)  # type: ignore[no-any-return]


def pools(cluster: Any, namespace: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in get_json(cluster, namespace, "inferencepools")["items"]}


def emitted(cluster: Any, namespace: str) -> dict[str, Any] | None:
    """The service's InferencePoolsEmitted condition, once it is about the current generation."""
    svc = get_json(cluster, namespace, "tisvc", "llama")
    for c in (svc.get("status") or {}).get("conditions", []):
        if (
            c["type"] == "InferencePoolsEmitted"
            and c.get("observedGeneration") == svc["metadata"]["generation"]
        ):
            return c  # type: ignore[no-any-return]
    return None


def wait_emitted(cluster: Any, namespace: str, status: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        c = emitted(cluster, namespace)
        return c if c and (c["status"], c["reason"]) == (status, reason) else None

    return wait_for(probe, timeout=60, what=f"InferencePoolsEmitted={status} ({reason})")


def test_inference_pools_appear_once_the_api_is_installed(
    cluster: Any, namespace: str, no_gie_api: None, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, service_doc())
    c = wait_emitted(cluster, namespace, "False", "APINotServed")
    assert "inference.networking.k8s.io/v1" in c["message"]
    # the rest of the service is reconciled as usual meanwhile
    wait_for(
        lambda: len(get_json(cluster, namespace, "deployments", "-l", SERVICE + "=llama")["items"]) == 4,
        timeout=60,
        what="the three pools' and the router's Deployments",
    )

    gie.install(cluster)
    # discovery is re-read once per resync period: no restart, no change to the service needed
    wait_for(
        lambda: sorted(pools(cluster, namespace)) == [f"llama-{r}" for r in ROLES],
        timeout=10 * RESYNC + 30,
        what="one InferencePool per role after the API appeared",
    )
    c = wait_emitted(cluster, namespace, "True", "Emitted")
    assert c["message"] == (
        "InferencePools llama-decode, llama-mixed, llama-prefill select this service's worker pods by role."
    )


def test_inference_pools_per_role_follow_the_service(
    cluster: Any, namespace: str, gie_api: None, operator: OperatorProcess
) -> None:
    doc = service_doc()
    apply(cluster, namespace, doc)
    wait_for(
        lambda: sorted(pools(cluster, namespace)) == [f"llama-{r}" for r in ROLES],
        timeout=90,
        what="one InferencePool per role",
    )
    wait_emitted(cluster, namespace, "True", "Emitted")
    svc = get_json(cluster, namespace, "tisvc", "llama")
    for name, pool in pools(cluster, namespace).items():
        role = name.removeprefix("llama-")
        spec = pool["spec"]
        assert spec["selector"] == {"matchLabels": {SERVICE: "llama", ROLE: role}}
        assert spec["targetPorts"] == [{"number": 8000}]
        assert spec["endpointPickerRef"] == {
            "group": "",
            "kind": "Service",
            "name": "llama-epp",
            "port": {"number": 9002},
            "failureMode": "FailClose",
        }
        (owner,) = pool["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner.get("controller")) == (
            "InferenceService",
            "llama",
            svc["metadata"]["uid"],
            True,
        )

        # the selector finds exactly the worker pods of that role, once they exist
        def selected(match: dict[str, str] = spec["selector"]["matchLabels"]) -> set[str] | None:
            selector = ",".join(f"{k}={v}" for k, v in match.items())
            found = get_json(cluster, namespace, "pods", "-l", selector)["items"]
            return {p["metadata"]["labels"][ROLE] for p in found} or None

        assert wait_for(selected, timeout=60, what=f"pods selected by InferencePool {name}") == {role}

    # the service's settings reach them
    settings = {"endpointPicker": "llm-d-epp", "endpointPickerPort": 9100, "failureMode": "FailOpen"}
    doc["spec"]["routing"] = {"inferencePool": settings}
    apply(cluster, namespace, doc)
    wanted = {
        "group": "",
        "kind": "Service",
        "name": "llm-d-epp",
        "port": {"number": 9100},
        "failureMode": "FailOpen",
    }
    wait_for(
        lambda: [p["spec"]["endpointPickerRef"] for p in pools(cluster, namespace).values()] == [wanted] * 3,
        timeout=60,
        what="the Endpoint Picker settings applied",
    )

    # a hand edit is put back (they are children like the others)
    cluster.kubectl(
        "patch", "inferencepool", "llama-decode", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"targetPorts": [{"number": 9999}]}}),
    )  # fmt: skip
    wait_for(
        lambda: pools(cluster, namespace)["llama-decode"]["spec"]["targetPorts"] == [{"number": 8000}],
        timeout=10 * RESYNC + 30,
        what="the hand-edited InferencePool restored",
    )

    # mode off: the operator removes the ones it made, and says why there are none
    doc["spec"]["routing"] = {"inferencePool": {"mode": "off"}}
    apply(cluster, namespace, doc)
    wait_for(lambda: not pools(cluster, namespace), timeout=60, what="InferencePools removed")
    wait_emitted(cluster, namespace, "False", "Disabled")
