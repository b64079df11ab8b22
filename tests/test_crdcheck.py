"""An older CRD in the cluster (Helm never upgrades CRDs) is found and named, not left to drop
fields silently: `tandem.crdcheck` compares, the controller reads, gauges and logs."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tandem import crdcheck
from tandem.controller import Controller, Settings
from tandem.kube import KubeError

SERVICE = "inferenceservices.inference.tandem.dev"
POOL = "acceleratorpools.inference.tandem.dev"


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def older_service_crd() -> dict[str, Any]:
    """The InferenceService CRD as an older release had it: no spec.pools[].maxUnavailable and
    no status.lastDecision."""
    crd = copy.deepcopy(crdcheck.expected_crds()[SERVICE])
    schema = _schema(crd)
    del schema["properties"]["spec"]["properties"]["pools"]["items"]["properties"]["maxUnavailable"]
    del schema["properties"]["status"]["properties"]["lastDecision"]
    return crd


def test_field_paths_name_lists_maps_and_stop_where_unknown_fields_are_kept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "pools": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                    },
                    "labels": {
                        "type": "object",
                        "additionalProperties": {"type": "object", "properties": {"v": {"type": "string"}}},
                    },
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }
        },
    }
    assert crdcheck.field_paths(schema) == {
        "spec",
        "spec.pools",
        "spec.pools[].name",
        "spec.labels",
        "spec.labels{}.v",
        "spec.free",
    }
    assert crdcheck.open_paths(schema) == {"spec.free"}


def test_the_current_crds_lack_nothing() -> None:
    for crd in crdcheck.expected_crds().values():
        assert crdcheck.missing_fields(copy.deepcopy(crd), crd) == []


def test_an_older_crd_is_named_field_by_field() -> None:
    expected = crdcheck.expected_crds()[SERVICE]
    version = expected["spec"]["versions"][0]["name"]
    missing = crdcheck.missing_fields(older_service_crd(), expected)
    assert f"{version}: spec.pools[].maxUnavailable" in missing
    assert (
        f"{version}: status.lastDecision" in missing and f"{version}: status.lastDecision.reason" in missing
    )
    assert all(
        m.startswith(f"{version}: spec.pools[].maxUnavailable") or "lastDecision" in m for m in missing
    )
    # a version the cluster does not serve
    unserved = copy.deepcopy(expected)
    unserved["spec"]["versions"][0]["served"] = False
    assert crdcheck.missing_fields(unserved, expected) == [f"{version}: (not served)"]
    # a status kept whole (an old CRD with x-kubernetes-preserve-unknown-fields) drops nothing
    open_status = older_service_crd()
    _schema(open_status)["properties"]["status"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    assert crdcheck.missing_fields(open_status, expected) == [f"{version}: spec.pools[].maxUnavailable"]
    text = crdcheck.summary(SERVICE, missing, limit=2)
    assert text.startswith(f"The cluster's CRD {SERVICE} is older than this operator: it lacks ")
    assert (
        f"and {len(missing) - 2} more" in text
        and "kubectl apply --server-side -f charts/tandem/crds/" in text
    )


class CrdKube:
    """Serves the CRD list the operator reads: the InferenceService CRD as ``service`` (None:
    absent), the AcceleratorPool CRD refused (no permission to list CRDs)."""

    def __init__(self, service: dict[str, Any] | None) -> None:
        self.service = service
        self.reads = 0

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None, **_: Any) -> dict:
        assert method == "GET" and path == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        self.reads += 1
        selector = dict(query or [])["fieldSelector"]
        if selector == f"metadata.name={POOL}":
            raise KubeError(403, "Forbidden")
        assert selector == f"metadata.name={SERVICE}"
        return {"items": [self.service] if self.service is not None else []}


def missing_gauge(crd: str) -> float | None:
    return REGISTRY.get_sample_value("tandem_crd_missing_fields", {"crd": crd})


def test_the_controller_gauges_and_logs_an_older_crd_once(caplog: pytest.LogCaptureFixture) -> None:
    kube = CrdKube(older_service_crd())
    controller = Controller(kube, Settings())  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="tandem.controller"):
        found = controller.check_crds()
        controller.check_crds()  # the next resync: the same fields, no second warning
    assert list(found) == [SERVICE]  # the refused one is not reported
    assert missing_gauge(SERVICE) == len(found[SERVICE]) > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "spec.pools[].maxUnavailable" in warnings[0]
    caplog.clear()
    # the CRDs applied: the gauge goes to 0, one line says so
    kube.service = crdcheck.expected_crds()[SERVICE]
    with caplog.at_level(logging.INFO, logger="tandem.controller"):
        assert controller.check_crds() == {SERVICE: []}
    assert missing_gauge(SERVICE) == 0
    assert [r.getMessage() for r in caplog.records] == [f"The cluster's CRD {SERVICE} is current."]
    # absent CRD (the operator runs against another cluster's API, say): nothing reported
    assert Controller(CrdKube(None), Settings()).check_crds() == {}  # type: ignore[arg-type]
