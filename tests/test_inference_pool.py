"""Gateway API Inference Extension interop without a cluster: the InferencePool builder against the
schema of the stand-in CRD the e2e installs (which follows upstream's v1 constraints), the
decision to emit or prune, the reconcile's handling of the API (present, absent, forbidden,
rejecting), API discovery and its cache, the InferencePoolsEmitted condition, the spec settings."""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from helpers import UID, make_ctx
from tandem.builders import Images, desired_objects
from tandem.builders.router import build_inference_pools
from tandem.children import plan_changes
from tandem.controller import Controller, Settings
from tandem.kube import Kube, KubeError
from tandem.models import InferenceServiceSpec
from tandem.models.inference_service import InferencePoolSettings
from tandem.reconcile import reconcile
from tandem.status import inference_pools_condition

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "e2e" / "crds" / "inferencepools.inference.networking.k8s.io.yaml"

POOLS = ["llama-decode", "llama-mixed", "llama-prefill"]


def with_routing(sample_service: dict[str, Any], **settings: Any) -> dict[str, Any]:
    spec = copy.deepcopy(sample_service["spec"])
    spec.setdefault("routing", {})["inferencePool"] = settings
    return spec  # type: ignore[no-any-return]


# ---- the builder against the CRD's schema ---------------------------------------------------------


def schema_problems(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What a structural schema says of ``value``: the subset of OpenAPI v3 the stand-in uses,
    with fields the schema does not declare reported as a server-side apply reports them."""
    check = {"object": _object_problems, "array": _array_problems, "integer": _integer_problems}
    return check.get(schema.get("type", ""), _string_problems)(value, schema, path)


def _object_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: not an object"]
    props = schema.get("properties")
    problems = [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
    for key, item in value.items():
        if props is not None and key in props:
            problems += schema_problems(item, props[key], f"{path}.{key}")
        elif "additionalProperties" in schema:
            problems += schema_problems(item, schema["additionalProperties"], f"{path}.{key}")
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}.{key}: field not declared in schema")
    if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", 1 << 30):
        problems.append(f"{path}: {len(value)} properties")
    for rule in schema.get("x-kubernetes-validations", []):
        if not check_rule(rule["rule"], value):
            problems.append(f"{path}: {rule['message']}")
    return problems


def _array_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(value, list):
        return [f"{path}: not a list"]
    problems = []
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30):
        problems.append(f"{path}: {len(value)} items")
    for i, item in enumerate(value):
        problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    return problems


def _integer_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [f"{path}: not an integer"]
    if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        return [f"{path}: {value} out of range"]
    return []


def _string_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    assert schema.get("type") == "string", f"teach schema_problems: {schema}"
    if not isinstance(value, str):
        return [f"{path}: not a string"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30):
        problems.append(f"{path}: length {len(value)}")
    return problems


def check_rule(rule: str, value: dict[str, Any]) -> bool:
    """The one CEL rule the stand-in has (upstream's endpointPickerRef rule), with its defaults."""
    assert rule == "self.kind != 'Service' || has(self.port)", f"teach check_rule: {rule}"
    return value.get("kind", "Service") != "Service" or "port" in value


@pytest.fixture(scope="module")
def inference_pool_schema() -> dict[str, Any]:
    crd = yaml.safe_load(STAND_IN.read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
    )
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1"
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]  # type: ignore[no-any-return]


def test_the_builders_inference_pools_fit_the_v1_schema(
    sample_service: dict[str, Any], sample_pools: dict[str, dict], inference_pool_schema: dict[str, Any]
) -> None:
    ctx = make_ctx(sample_service["spec"], sample_pools)
    for settings in (
        {},
        {"endpointPicker": "llm-d-epp", "endpointPickerPort": 65535, "failureMode": "FailOpen"},
    ):
        built = desired_objects(
            make_ctx(with_routing(sample_service, **settings), sample_pools), inference_pools=True
        )
        pools = [o for o in built if o["kind"] == "InferencePool"]
        assert [p["metadata"]["name"] for p in pools] == POOLS
        for pool in pools:
            assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
            assert schema_problems(pool["spec"], inference_pool_schema) == []
    ref = build_inference_pools(ctx)[0]["spec"]["endpointPickerRef"]
    assert ref == {
        "group": "",
        "kind": "Service",
        "name": "llama-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }


def test_the_schema_check_catches_the_pre_release_shape(inference_pool_schema: dict[str, Any]) -> None:
    """endpointPickerRef.portNumber (v1.0.0-rc.1) is what the builder wrote before; v1 refuses it."""
    spec = {
        "selector": {"matchLabels": {"a": "b"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "epp", "kind": "Service", "portNumber": 9002},
    }
    assert schema_problems(spec, inference_pool_schema) == [
        ".endpointPickerRef.portNumber: field not declared in schema",
        ".endpointPickerRef: port is required when kind is 'Service' or unspecified (defaults to 'Service')",
    ]
    two_ports = {**spec, "targetPorts": [{"number": 1}, {"number": 2}], "endpointPickerRef": {"name": "e"}}
    assert schema_problems(two_ports, inference_pool_schema) == [
        ".targetPorts: 2 items",
        ".endpointPickerRef: port is required when kind is 'Service' or unspecified (defaults to 'Service')",
    ]


# ---- deciding: emit, prune ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "mode", "wanted"),
    [(True, "auto", POOLS), (False, "auto", []), (True, "off", []), (False, "off", [])],
)
def test_inference_pools_are_desired_only_when_served_and_not_off(
    sample_service: dict[str, Any], sample_pools: dict[str, dict], served: bool, mode: str, wanted: list[str]
) -> None:
    ctx = make_ctx(with_routing(sample_service, mode=mode), sample_pools)
    desired = desired_objects(ctx, inference_pools=served)
    assert [o["metadata"]["name"] for o in desired if o["kind"] == "InferencePool"] == wanted
    # the rest does not depend on it
    others = [o for o in desired if o["kind"] != "InferencePool"]
    assert others == [
        o for o in desired_objects(ctx, inference_pools=not served) if o["kind"] != "InferencePool"
    ]


def test_owned_inference_pools_are_pruned_when_off_and_left_alone_when_current(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    auto = desired_objects(make_ctx(sample_service["spec"], sample_pools), inference_pools=True)
    live = copy.deepcopy(auto)
    for obj in live:  # what the apiserver adds does not count as a difference
        obj["metadata"]["resourceVersion"] = "7"
        if obj["kind"] == "InferencePool":
            obj["spec"]["appProtocol"] = "http"
    assert plan_changes(auto, live) == ([], [])
    off = desired_objects(
        make_ctx(with_routing(sample_service, mode="off"), sample_pools), inference_pools=True
    )
    to_apply, to_prune = plan_changes(off, live)
    assert to_apply == []
    assert [o["metadata"]["name"] for o in to_prune if o["kind"] == "InferencePool"] == POOLS
    assert {o["kind"] for o in to_prune} == {"InferencePool"}
    # a new Endpoint Picker port re-applies every pool and nothing else
    moved = desired_objects(
        make_ctx(with_routing(sample_service, endpointPickerPort=9100), sample_pools), inference_pools=True
    )
    to_apply, to_prune = plan_changes(moved, live)
    assert [o["metadata"]["name"] for o in to_apply] == POOLS and to_prune == []


# ---- reconcile with the API present, absent, forbidden --------------------------------------------


class FakeKube:
    """An in-memory apiserver for one namespace: lists by label, applies, deletes, patches status.
    ``inference_pools``: None (listed normally) or the HTTP status its LIST fails with."""

    def __init__(
        self,
        inference_pools: int | None = None,
        reject: tuple[str, str] | None = None,
        reject_status: int = 422,
        reject_message: str = "spec.endpointPickerRef.port: Required value",
    ) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.inference_pools = inference_pools
        self.reject, self.reject_status, self.reject_message = reject, reject_status, reject_message
        self.deleted: list[tuple[str, str]] = []
        self.status: dict[str, Any] | None = None

    def list_objects(
        self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        if kind == "InferencePool" and self.inference_pools is not None:
            raise KubeError(
                self.inference_pools, "Error", {"message": f"{self.inference_pools} from the fake"}
            )
        return [
            copy.deepcopy(o)
            for (k, _), o in self.objects.items()
            if k == kind
            and all(o["metadata"].get("labels", {}).get(a) == b for a, b in (labels or {}).items())
        ]

    def apply(self, manifest: dict[str, Any], field_manager: str = "tandem-operator") -> dict[str, Any]:
        if (manifest["kind"], manifest["metadata"]["name"]) == self.reject:
            raise KubeError(self.reject_status, "Refused", {"message": self.reject_message})
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = copy.deepcopy(manifest)
        return copy.deepcopy(manifest)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self.deleted.append((kind, name))
        self.objects.pop((kind, name), None)

    def patch_status(
        self, kind: str, name: str, namespace: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.status = status
        return {}

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.objects if k == kind)


def body(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    meta = {"name": "llama", "namespace": "team-a", "uid": UID, "generation": generation}
    return {"metadata": meta, "spec": spec}


def run(
    kube: FakeKube, spec: dict[str, Any], pools: dict[str, dict], served: bool, generation: int = 1
) -> Any:
    return asyncio.run(
        reconcile(
            body(spec, generation),
            kube=kube,  # type: ignore[arg-type]
            pools=pools,
            images=Images(),
            now="2026-01-01T00:00:00Z",
            inference_pools=served,
        )
    )


def emitted(kube: FakeKube) -> dict[str, Any]:
    assert kube.status is not None
    (c,) = [c for c in kube.status["conditions"] if c["type"] == "InferencePoolsEmitted"]
    return c  # type: ignore[no-any-return]


def test_reconcile_applies_owned_inference_pools_and_prunes_them_when_turned_off(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    kube = FakeKube()
    outcome = run(kube, sample_service["spec"], sample_pools, served=True)
    assert kube.names("InferencePool") == POOLS
    assert {f"InferencePool team-a/{n}" for n in POOLS} <= set(outcome.applied)
    for name in POOLS:
        (owner,) = kube.objects[("InferencePool", name)]["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferenceService", UID, True)
    c = emitted(kube)
    assert (c["status"], c["reason"]) == ("True", "Emitted")
    assert outcome.inference_pool_api == "served"

    again = run(kube, sample_service["spec"], sample_pools, served=True)
    assert again.applied == [] and again.pruned == []  # a no-op reconcile writes nothing

    off = run(kube, with_routing(sample_service, mode="off"), sample_pools, served=True, generation=2)
    assert sorted(off.pruned) == [f"InferencePool team-a/{n}" for n in POOLS]
    assert kube.names("InferencePool") == [] and len(kube.names("Deployment")) == 4
    c = emitted(kube)
    assert (c["status"], c["reason"], c["observedGeneration"]) == ("False", "Disabled", 2)


def test_reconcile_without_the_api_applies_the_rest_and_says_so(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    kube = FakeKube()
    outcome = run(kube, sample_service["spec"], sample_pools, served=False)
    assert kube.names("InferencePool") == [] and len(kube.names("Deployment")) == 4
    assert (emitted(kube)["status"], emitted(kube)["reason"]) == ("False", "APINotServed")
    assert outcome.inference_pool_api == "absent" and outcome.problems == []


@pytest.mark.parametrize(
    ("status", "api", "reason"), [(404, "absent", "APINotServed"), (403, "forbidden", "Forbidden")]
)
def test_a_failed_inference_pool_list_leaves_them_out_and_nothing_else(
    sample_service: dict[str, Any], sample_pools: dict[str, dict], status: int, api: str, reason: str
) -> None:
    kube = FakeKube(inference_pools=status)
    outcome = run(kube, sample_service["spec"], sample_pools, served=True)
    assert outcome.inference_pool_api == api
    assert len(kube.names("Deployment")) == 4 and kube.deleted == []  # nothing pruned blind
    assert not any(a.startswith("InferencePool") for a in outcome.applied)
    assert (emitted(kube)["status"], emitted(kube)["reason"]) == ("False", reason)
    assert outcome.problems == []  # an optional API does not make the service unready


def test_other_inference_pool_list_errors_fail_the_reconcile(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    with pytest.raises(KubeError):
        run(FakeKube(inference_pools=500), sample_service["spec"], sample_pools, served=True)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (422, "spec.endpointPickerRef.port: Required value"),
        # what a real apiserver answers a server-side apply with a field the CRD does not declare
        (
            500,
            "failed to create typed patch object: "
            ".spec.endpointPickerRef.portNumber: field not declared in schema",
        ),
    ],
)
def test_a_refused_inference_pool_is_reported_and_stops_nothing(
    sample_service: dict[str, Any], sample_pools: dict[str, dict], status: int, message: str
) -> None:
    kube = FakeKube(reject=("InferencePool", "llama-mixed"), reject_status=status, reject_message=message)
    outcome = run(kube, sample_service["spec"], sample_pools, served=True)
    assert kube.names("InferencePool") == ["llama-decode", "llama-prefill"]
    assert len(kube.names("Deployment")) == 4  # the workers and the router rolled out regardless
    c = emitted(kube)
    assert (c["status"], c["reason"]) == ("False", "ApplyFailed")
    assert c["message"] == f"The apiserver refused InferencePool llama-mixed (llama-mixed: {message})."
    assert outcome.problems == [] and outcome.inference_pool_failures == {"llama-mixed": message}


def test_the_condition_reasons() -> None:
    def cond(**kw: Any) -> tuple[str, str, str]:
        c = inference_pools_condition(
            generation=3, **{"mode": "auto", "api": "served", "emitted": POOLS, **kw}
        )
        assert c.observed_generation == 3 and c.type == "InferencePoolsEmitted"
        return c.status, c.reason, c.message

    assert cond() == (
        "True",
        "Emitted",
        "InferencePools llama-decode, llama-mixed, llama-prefill select this service's worker pods by role.",
    )
    assert cond(emitted=["a-mixed"])[2] == "InferencePool a-mixed selects this service's worker pods by role."
    assert cond(mode="off", api="absent")[:2] == ("False", "Disabled")  # the user's choice explains it
    assert cond(api="absent")[:2] == ("False", "APINotServed")
    assert "grant it list, create, patch and delete" in cond(api="forbidden")[2]
    assert cond(failed={"b": "no.", "a": "denied"})[:3] == (
        "False",
        "ApplyFailed",
        "The apiserver refused InferencePools a, b (a: denied; b: no).",
    )


# ---- API discovery --------------------------------------------------------------------------------


class DiscoveryKube:
    def __init__(self) -> None:
        self.answers: list[bool | Exception] = []
        self.calls = 0

    def serves(self, kind: str) -> bool:
        assert kind == "InferencePool"
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_discovery_is_cached_for_a_resync_period_and_survives_failures() -> None:
    kube = DiscoveryKube()
    kube.answers = [False, True, KubeError(503, "Unavailable"), False]

    async def scenario() -> list[bool]:
        controller = Controller(kube, Settings(resync_seconds=0.2))  # type: ignore[arg-type]
        seen = [await controller.inference_pools_served(), await controller.inference_pools_served()]
        await asyncio.sleep(0.25)
        seen.append(await controller.inference_pools_served())  # the CRD was installed meanwhile
        seen.append(await controller.inference_pools_served())  # cached
        await asyncio.sleep(0.25)
        seen.append(await controller.inference_pools_served())  # discovery failed: last answer kept
        await asyncio.sleep(0.25)
        seen.append(await controller.inference_pools_served())  # the CRD was removed
        return seen

    assert asyncio.run(scenario()) == [False, False, True, True, True, False]
    assert kube.calls == 4


def test_discovery_is_re_read_at_least_every_minute_whatever_the_resync() -> None:
    from tandem.controller import DISCOVERY_SECONDS

    kube = DiscoveryKube()
    kube.answers = [False, True]

    async def scenario() -> list[bool]:
        controller = Controller(kube, Settings(resync_seconds=3600))  # type: ignore[arg-type]
        first = await controller.inference_pools_served()
        assert controller._gie_checked is not None
        controller._gie_checked -= DISCOVERY_SECONDS  # a minute later
        return [first, await controller.inference_pools_served()]

    assert asyncio.run(scenario()) == [False, True]


class ApiKube(Kube):
    """Kube with its HTTP request replaced by canned discovery answers."""

    def __init__(self, answer: dict[str, Any] | KubeError) -> None:
        self.answer = answer
        self.paths: list[str] = []

    def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.paths.append(f"{method} {path}")
        if isinstance(self.answer, KubeError):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "served"),
    [
        ({"resources": [{"name": "inferencepools"}, {"name": "inferencepools/status"}]}, True),
        ({"resources": [{"name": "inferenceobjectives"}]}, False),
        (KubeError(404, "NotFound"), False),
    ],
)
def test_kube_serves_reads_the_group_versions_discovery(answer: Any, served: bool) -> None:
    kube = ApiKube(answer)
    assert kube.serves("InferencePool") is served
    assert kube.paths == ["GET /apis/inference.networking.k8s.io/v1"]


def test_kube_serves_raises_other_errors() -> None:
    with pytest.raises(KubeError):
        ApiKube(KubeError(503, "Unavailable")).serves("InferencePool")


# ---- the spec's settings ---------------------------------------------------------------------------


def test_inference_pool_settings_defaults_are_on_the_wire() -> None:
    assert InferencePoolSettings().to_wire() == {
        "mode": "auto",
        "endpointPickerPort": 9002,
        "failureMode": "FailClose",
    }
    crd = yaml.safe_load((ROOT / "crds" / "inference.tandem.dev_inferenceservices.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    routing = spec["properties"]["routing"]
    assert routing["default"]["inferencePool"] == {
        "mode": "auto",
        "endpointPickerPort": 9002,
        "failureMode": "FailClose",
    }
    props = routing["properties"]["inferencePool"]["properties"]
    assert props["mode"]["enum"] == ["auto", "off"]
    assert props["failureMode"]["enum"] == ["FailOpen", "FailClose"]  # upstream's values
    assert (props["endpointPickerPort"]["minimum"], props["endpointPickerPort"]["maximum"]) == (1, 65535)


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        ({"mode": "always"}, "mode", "Input should be 'auto' or 'off'"),
        ({"endpointPicker": "Not_A_Name"}, "endpointPicker", "should match pattern"),
        ({"endpointPicker": "x" * 64}, "endpointPicker", "at most 63 characters"),
        ({"endpointPickerPort": 0}, "endpointPickerPort", "greater than or equal to 1"),
        ({"endpointPickerPort": 70000}, "endpointPickerPort", "less than or equal to 65535"),
        ({"failureMode": "failopen"}, "failureMode", "Input should be 'FailOpen' or 'FailClose'"),
        ({"portNumber": 9002}, "portNumber", "Extra inputs are not permitted"),
    ],
)
def test_inference_pool_settings_are_validated_with_messages(
    sample_service: dict[str, Any], settings: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceServiceSpec.model_validate(with_routing(sample_service, **settings))
    (error,) = info.value.errors()
    assert error["loc"][-1] == field or field in error["loc"], error["loc"]
    assert re.search(re.escape(message), error["msg"]), error["msg"]
