"""Property-based bad input: hypothesis generates InferenceService and AcceleratorPool documents,
valid and invalid, and sends each to the real apiserver (``fieldValidation=Strict``, as
``kubectl apply`` does).

The properties:
* a document with a mutation known to be invalid (wrong types, unknown fields, out-of-range or
  malformed values, oversized contents, a namespace other than the one it is sent to) is rejected
  at admission, with a message;
* every document the apiserver accepts is reconciled by the running operator without an exception:
  its status reaches the current generation with a ``Ready`` condition (True, or False with a
  reason), the operator stays healthy and logs no traceback.

The counts are printed (``-s`` shows them) and written to .tandem/e2e/bad-input.json.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds
from tandem.models.common import toleration_problems

GROUP, VERSION = "inference.tandem.dev", "v1alpha1"
MAX_EXAMPLES_SERVICE = 120
MAX_EXAMPLES_POOL = 60

BASE_SERVICE: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "InferenceService",
    "metadata": {"name": "x"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "preset": "llama-3.1-8b"},
        "engine": "sim",
        "pools": [
            {"name": "prefill", "role": "prefill", "acceleratorPool": "b200", "tensorParallelSize": 1},
            {
                "name": "decode",
                "role": "decode",
                "acceleratorPool": "gaudi3",
                "replicas": {"min": 1, "max": 2},
            },
            {"name": "mixed", "role": "mixed", "acceleratorPool": "h100"},
        ],
        "slo": {"ttftSeconds": 2, "itlSeconds": 0.1},
        "routing": {"disaggregation": "auto", "minPromptTokens": 1024},
    },
}
BASE_POOL: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "AcceleratorPool",
    "metadata": {"name": "x"},
    "spec": {
        "vendor": "nvidia",
        "model": "H100-SXM",
        "nodeSelector": {"inference.tandem.dev/accelerator-model": "H100-SXM"},
        "devicesPerNode": 8,
        "costPerDeviceHour": "3.10",
    },
}

Mutation = tuple[str, list[str | int], Any]  # (kind, path, value); kind "invalid" or "maybe"

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2),
)
NAMEISH = st.one_of(
    st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
    st.text(min_size=0, max_size=70),
)


def _type_mismatch(expected: type) -> st.SearchStrategy[Any]:
    """A JSON value whose type differs from ``expected`` (ints and floats count as one number type)."""

    def wrong(v: Any) -> bool:
        if v is None:
            return False  # null is pruned/defaulted by the apiserver for optional fields
        if expected in (int, float):
            return not isinstance(v, (int, float)) or isinstance(v, bool)
        return not isinstance(v, expected)

    return JUNK.filter(wrong)


SERVICE_TYPED_FIELDS: list[tuple[list[str | int], type]] = [
    (["spec", "model"], dict),
    (["spec", "model", "name"], str),
    (["spec", "pools"], list),
    (["spec", "pools", 0, "name"], str),
    (["spec", "pools", 0, "tensorParallelSize"], int),
    (["spec", "pools", 1, "replicas"], dict),
    (["spec", "pools", 1, "replicas", "max"], int),
    (["spec", "pools", 2, "acceleratorPool"], str),
    (["spec", "slo", "ttftSeconds"], float),
    (["spec", "routing"], dict),
    (["spec", "routing", "minPromptTokens"], int),
]


@st.composite
def service_mutation(draw: st.DrawFn) -> Mutation:  # noqa: C901 (a flat table of cases)
    choice = draw(st.integers(min_value=0, max_value=13))
    i = draw(st.integers(min_value=0, max_value=2))
    if choice == 0:  # wrong type somewhere
        path, expected = draw(st.sampled_from(SERVICE_TYPED_FIELDS))
        return ("invalid", path, draw(_type_mismatch(expected)))
    if choice == 1:  # unknown field (strict field validation)
        where = draw(st.sampled_from([["spec"], ["spec", "pools", i], ["spec", "model"], ["spec", "slo"]]))
        return ("invalid", [*where, "x" + draw(st.from_regex(r"[a-zA-Z]{1,10}", fullmatch=True))], 1)
    if choice == 2:  # out of range numbers
        field, bad = draw(
            st.sampled_from(
                [
                    ("tensorParallelSize", draw(st.sampled_from([0, -1, 3, 5, 6, 128, 2**31]))),
                    ("replicas", {"min": -1, "max": 1}),
                    ("replicas", {"min": 0, "max": 1001}),
                    ("replicas", {"min": 3, "max": 2}),
                ]
            )
        )
        return ("invalid", ["spec", "pools", i, field], bad)
    if choice == 3:  # oversized: huge strings and too many items
        big = draw(st.sampled_from(["args", "env", "name", "manyPools", "annotation"]))
        if big == "args":
            return ("invalid", ["spec", "pools", i, "args"], ["--x=" + "a" * 40_000] * 65)
        if big == "env":
            return (
                "invalid",
                ["spec", "pools", i, "env"],
                [{"name": f"E{j}", "value": "v"} for j in range(65)],
            )
        if big == "name":
            return ("invalid", ["spec", "pools", i, "name"], "p" * draw(st.integers(20, 300)))
        if big == "annotation":
            return ("invalid", ["metadata", "annotations"], {"a": "x" * 300_000})
        pools = [{"name": f"p{j}", "role": "mixed", "acceleratorPool": "h100"} for j in range(40)]
        return ("invalid", ["spec", "pools"], pools)
    if choice == 4:  # an enum value that does not exist
        field = draw(
            st.sampled_from(
                [["spec", "engine"], ["spec", "pools", i, "role"], ["spec", "routing", "disaggregation"]]
            )
        )
        return ("invalid", field, draw(st.sampled_from(["", "VLLM", "encode", "never ", "tgi", "auto;rm"])))
    if choice == 5:  # another namespace than the one the request goes to
        return ("invalid", ["metadata", "namespace"], draw(st.sampled_from(["kube-system", "default"])))
    if choice == 6:  # malformed names
        bad = draw(st.sampled_from(["Prefill", "pre_fill", "-x", "x-", "", "a.b", "ünï"]))
        return ("invalid", ["spec", "pools", i, "name"], bad)
    if choice == 7:  # a reference to another namespace's or an unknown pool: admitted, reported
        ref = draw(st.sampled_from(["kube-system/h100", "../h100", "nope", "H100", "default.h100"]))
        return ("maybe", ["spec", "pools", i, "acceleratorPool"], ref)
    if choice == 8:  # env from a Secret in another namespace (pods cannot; the operator must not read it)
        value_from = {"secretKeyRef": {"name": "token", "key": "t", "namespace": "kube-system"}}
        return ("maybe", ["spec", "pools", i, "env"], [{"name": "TOKEN", "valueFrom": value_from}])
    if choice == 9:  # arbitrary values in free-text places
        field = draw(st.sampled_from([["spec", "model", "name"], ["spec", "pools", i, "image"]]))
        return ("maybe", field, draw(st.text(min_size=1, max_size=200)))
    if choice == 10:  # arbitrary extra args
        return ("maybe", ["spec", "pools", i, "args"], draw(st.lists(st.text(max_size=40), max_size=5)))
    if choice == 11:  # arbitrary numbers in range-checked places
        field = draw(st.sampled_from(["ttftSeconds", "itlSeconds", "attainment"]))
        value = draw(st.floats(min_value=-10, max_value=1e6, allow_nan=False, allow_infinity=False))
        return ("maybe", ["spec", "slo", field], value)
    if choice == 12:  # arbitrary service names
        return ("maybe", ["metadata", "name"], draw(NAMEISH))
    replicas = {"min": draw(st.integers(0, 5)), "max": draw(st.integers(0, 5))}
    return ("maybe", ["spec", "pools", i, "replicas"], replicas)


@st.composite
def pool_mutation(draw: st.DrawFn) -> Mutation:
    choice = draw(st.integers(min_value=0, max_value=6))
    if choice == 0:
        field, expected = draw(
            st.sampled_from(
                [("vendor", str), ("devicesPerNode", int), ("nodeSelector", dict), ("tolerations", list)]
            )
        )
        return ("invalid", ["spec", field], draw(_type_mismatch(expected)))
    if choice == 1:
        return ("invalid", ["spec", "x" + draw(st.from_regex(r"[a-zA-Z]{1,8}", fullmatch=True))], "y")
    if choice == 2:
        return ("invalid", ["spec", "vendor"], draw(st.sampled_from(["", "NVIDIA", "ibm", "apple"])))
    if choice == 3:
        return ("invalid", ["spec", "devicesPerNode"], draw(st.sampled_from([0, -8, 65, 10_000])))
    if choice == 4:
        return ("invalid", ["spec", "costPerDeviceHour"], draw(st.sampled_from(["-1", "abc", "1,5", "1e9x"])))
    if choice == 5:
        return ("maybe", ["spec", "model"], draw(st.text(min_size=0, max_size=80)))
    tol = {
        "key": draw(st.one_of(st.text(max_size=10), st.sampled_from(["example.com/gpu", "a_b.c", "x/y/z"]))),
        "operator": draw(st.sampled_from(["Exists", "Equal", "Bogus"])),
    }
    if draw(st.booleans()):
        tol["value"] = draw(st.one_of(st.text(max_size=8), st.sampled_from(["true", "a-b_c.d"])))
    if draw(st.booleans()):
        tol["effect"] = draw(st.sampled_from(["NoSchedule", "NoExecute"]))
        tol["tolerationSeconds"] = 30
    # the same sentences the CRD's rules give, checked in Python: invalid is known in advance
    bad = tol["operator"] == "Bogus" or toleration_problems(
        tol["key"], tol["operator"], tol.get("value"), tol.get("effect"), tol.get("tolerationSeconds")
    )
    return ("invalid" if bad else "maybe", ["spec", "tolerations"], [tol])


def mutate(base: dict[str, Any], mutations: list[Mutation]) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    for _, path, value in mutations:
        node: Any = doc
        for part in path[:-1]:
            if isinstance(part, int):
                node = node[part] if part < len(node) else node[-1]
            else:
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(last, int):
            if isinstance(node, list) and last < len(node):
                node[last] = value
        elif isinstance(node, dict):
            node[last] = value
    return doc


class Tally:
    def __init__(self) -> None:
        self.tried = {"InferenceService": 0, "AcceleratorPool": 0}
        self.rejected = {"InferenceService": 0, "AcceleratorPool": 0}
        self.known_invalid = {"InferenceService": 0, "AcceleratorPool": 0}
        self.accepted: list[tuple[str, str]] = []  # (kind, name)
        self.messages: dict[str, str] = {}


def create(api: Any, kind: str, namespace: str, doc: dict[str, Any]) -> tuple[int, str]:
    """POSTs ``doc``; returns (HTTP status, message)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    objects = client.CustomObjectsApi(api)
    try:
        if kind == "InferenceService":
            objects.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "inferenceservices", doc, field_validation="Strict"
            )
        else:
            objects.create_cluster_custom_object(
                GROUP, VERSION, "acceleratorpools", doc, field_validation="Strict"
            )
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except ValueError:
            message = str(exc.body or exc.reason)
        return exc.status, message
    return 201, ""


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    summary = {
        "tried": t.tried,
        "rejected": t.rejected,
        "known_invalid": t.known_invalid,
        "accepted": len(t.accepted),
    }
    print("bad input:", json.dumps(summary))
    out = STATE_ROOT / "e2e" / "bad-input.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "sample_messages": dict(list(t.messages.items())[:40])}, indent=2))


@pytest.fixture
def operator(cluster: Any, namespace: str, diagnostics: Any) -> Iterator[OperatorProcess]:
    """The real operator, watching only this test's namespace; always stopped."""
    install_crds(cluster)
    op = OperatorProcess.for_namespace(cluster, namespace, resync_seconds=3.0)
    diagnostics.add_log(op.log_path)
    try:
        yield op.start()
    finally:
        op.stop()


def _run(
    cluster: Any,
    namespace: str,
    op: OperatorProcess,
    tally: Tally,
    kind: str,
    base: dict[str, Any],
    mutations_strategy: st.SearchStrategy[Mutation],
    max_examples: int,
    name_for: Callable[[int], str],
) -> None:
    api = cluster.api()
    counter = [0]

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(st.lists(mutations_strategy, min_size=0, max_size=3))
    def property_(mutations: list[Mutation]) -> None:
        counter[0] += 1
        doc = mutate(base, mutations)
        name = name_for(counter[0])
        if not any(p[:2] == ["metadata", "name"] for _, p, _ in mutations):
            doc["metadata"]["name"] = name
        invalid = any(k == "invalid" for k, _, _ in mutations)
        tally.tried[kind] += 1
        tally.known_invalid[kind] += invalid
        status, message = create(api, kind, namespace, doc)
        if status == 409 and not invalid:  # a generated name that an earlier example took
            tally.tried[kind] -= 1
            return
        if status >= 400:
            tally.rejected[kind] += 1
            assert 400 <= status < 500, (status, message, mutations)
            assert message.strip(), (status, mutations)
            tally.messages.setdefault(f"{status}: {message[:160]}", "")
        else:
            assert not invalid, f"admitted a known-invalid {kind}: {mutations}"
            tally.accepted.append((kind, doc["metadata"]["name"]))

    property_()


def _reconciled(cluster: Any, namespace: str, names: list[str]) -> bool:
    items = json.loads(cluster.kubectl("get", "inferenceservices", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    by_name = {i["metadata"]["name"]: i for i in items}
    for name in names:
        svc = by_name.get(name)
        if svc is None:
            return False
        status = svc.get("status") or {}
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        if status.get("observedGeneration") != svc["metadata"]["generation"] or not ready:
            return False
        if ready[0]["status"] != "True" and not ready[0].get("reason"):
            return False
    return True


def test_generated_inference_services(
    cluster: Any, namespace: str, operator: OperatorProcess, tally: Tally, diagnostics: Any
) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "e2e/samples/acceleratorpools.yaml")
    _run(
        cluster,
        namespace,
        operator,
        tally,
        "InferenceService",
        BASE_SERVICE,
        service_mutation(),
        MAX_EXAMPLES_SERVICE,
        lambda n: f"gen-{n}",
    )
    names = [n for k, n in tally.accepted if k == "InferenceService"]
    assert tally.rejected["InferenceService"] >= tally.known_invalid["InferenceService"]
    wait_for(
        lambda: _reconciled(cluster, namespace, names),
        timeout=90,
        what=f"{len(names)} accepted services reconciled",
    )
    assert operator.healthy()
    log_text = operator.log_text()
    assert "Traceback" not in log_text, log_text[-5000:]


def test_generated_accelerator_pools(
    cluster: Any, namespace: str, operator: OperatorProcess, tally: Tally, diagnostics: Any
) -> None:
    prefix = f"bi-{namespace[-5:]}"
    try:
        _run(
            cluster,
            namespace,
            operator,
            tally,
            "AcceleratorPool",
            BASE_POOL,
            pool_mutation(),
            MAX_EXAMPLES_POOL,
            lambda n: f"{prefix}-{n}",
        )
        # a service using an accepted pool must reconcile too (the pool's spec reaches the builders)
        pools = [n for k, n in tally.accepted if k == "AcceleratorPool"]
        docs = []
        for i, pool in enumerate(pools[:10]):
            doc = copy.deepcopy(BASE_SERVICE)
            doc["metadata"] = {"name": f"on-{i}", "namespace": namespace}
            doc["spec"]["pools"] = [{"name": "mixed", "role": "mixed", "acceleratorPool": pool}]
            docs.append(doc)
            assert create(cluster.api(), "InferenceService", namespace, doc)[0] == 201
        wait_for(
            lambda: _reconciled(cluster, namespace, [d["metadata"]["name"] for d in docs]),
            timeout=90,
            what="services on generated pools reconciled",
        )
        assert operator.healthy()
        assert "Traceback" not in operator.log_text()
    finally:
        for kind, name in tally.accepted:
            if kind == "AcceleratorPool":
                cluster.kubectl("delete", "acceleratorpool", name, "--wait=false", check=False)
