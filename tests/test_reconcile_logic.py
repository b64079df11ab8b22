"""Pure pieces of the reconcile: replicas policy, reference resolution, child diffing, status."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from helpers import apply_merge_patch, is_sentence
from tandem.children import is_subset, needs_apply, plan_changes, replicas_handovers
from tandem.models import InferenceServiceSpec, InferenceServiceStatus
from tandem.models.common import Condition
from tandem.models.inference_service import RoleSummary
from tandem.planner import base_replicas
from tandem.resolve import resolve
from tandem.status import (
    compute_status,
    known,
    merge_condition,
    merge_patch,
    ratio,
    set_conditions,
    status_changed,
)


def spec(**pools_override: Any) -> InferenceServiceSpec:
    doc: dict[str, Any] = {
        "model": {"name": "m", "preset": "llama-3.1-8b"},
        "pools": [
            {"name": "p", "role": "prefill", "acceleratorPool": "b200", "replicas": {"min": 1, "max": 4}},
            {"name": "d", "role": "decode", "acceleratorPool": "gaudi3", "replicas": {"min": 2, "max": 6}},
        ],
    }
    doc.update(pools_override)
    return InferenceServiceSpec.model_validate(doc)


# replicas
@pytest.mark.parametrize(
    ("mode", "live", "expected"),
    [
        ("off", {"p": {"spec": {"replicas": 3}}}, {"p": 1, "d": 2}),
        ("planner", {"p": {"spec": {"replicas": 3}}}, {"p": 3, "d": 2}),
        ("planner", {"p": {"spec": {"replicas": 9}}, "d": {"spec": {"replicas": 0}}}, {"p": 4, "d": 2}),
        ("external", {"p": {"spec": {"replicas": 3}}}, {"p": None, "d": 2}),
        ("recommend", {"p": {"spec": {"replicas": 3}}}, {"p": None, "d": 2}),
    ],
)
def test_base_replicas(mode: str, live: dict, expected: dict) -> None:
    s = spec(autoscaling={"mode": mode})
    assert base_replicas(s, live) == expected


# references
def test_resolve_reports_every_problem(sample_pools: dict[str, dict]) -> None:
    s = InferenceServiceSpec.model_validate(
        {
            "model": {"name": "m", "preset": "llama-3.1-8b"},
            "pools": [
                {"name": "p", "role": "prefill", "acceleratorPool": "nope"},
                {"name": "d", "role": "decode", "acceleratorPool": "gaudi3", "tensorParallelSize": 16},
                {"name": "x", "role": "mixed", "acceleratorPool": "h100"},
            ],
        }
    )
    res = resolve(s, sample_pools)
    assert [p.reason for p in res.problems] == ["AcceleratorPoolNotFound", "TensorParallelTooLarge"]
    assert "'nope'" in res.problems[0].message
    assert "8 devices per node" in res.problems[1].message
    assert set(res.accelerator_pools) == {"x"}
    assert not res.ok


def test_resolve_reports_broken_pool_objects(sample_pools: dict[str, dict]) -> None:
    broken = dict(sample_pools, b200={"vendor": "nvidia"})  # model missing
    res = resolve(spec(), broken)
    assert res.problems[0].reason == "InvalidAcceleratorPool"
    assert "model" in res.problems[0].message


# diffing
def test_subset_ignores_server_defaults() -> None:
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}}
    actual = copy.deepcopy(desired)
    actual["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    actual["spec"]["progressDeadlineSeconds"] = 600
    assert is_subset(desired, actual)
    actual["spec"]["template"]["spec"]["containers"][0]["image"] = "hand-edited"
    assert not is_subset(desired, actual)
    assert is_subset({"port": 8000}, {"port": "8000"})
    assert not is_subset({"a": [1, 2]}, {"a": [1]})


def obj(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", **extra}, "spec": {"x": 1}}


def test_plan_changes() -> None:
    desired = [obj("Deployment", "a"), obj("Service", "a"), obj("Deployment", "b")]
    live = [
        obj("Deployment", "a"),  # unchanged
        {**obj("Service", "a"), "spec": {"x": 2}},  # edited by hand
        obj("Deployment", "gone"),  # no longer desired
        obj("Deployment", "dying", deletionTimestamp="2026-01-01T00:00:00Z"),
    ]
    to_apply, to_prune = plan_changes(desired, live)
    assert [(o["kind"], o["metadata"]["name"]) for o in to_apply] == [("Service", "a"), ("Deployment", "b")]
    assert [o["metadata"]["name"] for o in to_prune] == ["gone"]
    assert not needs_apply(obj("Deployment", "a"), obj("Deployment", "a"))


# status
def dep(replicas: int, ready: int, generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
        },
    }


def conds(status: InferenceServiceStatus) -> dict[str, Condition]:
    return {c.type: c for c in status.conditions}


def test_status_ready_when_everything_is_ready(sample_pools: dict[str, dict]) -> None:
    s = spec()
    st = compute_status(
        spec=s,
        generation=3,
        resolution=resolve(s, sample_pools),
        deployments={"p": dep(1, 1), "d": dep(2, 2)},
        router=dep(1, 1),
        endpoint="http://x",
        previous=InferenceServiceStatus(),
        now="2026-11-22T00:00:00Z",
    )
    c = conds(st)
    assert c["Ready"].status == "True" and c["Ready"].reason == "AllReplicasReady"
    assert c["Progressing"].status == "False" and c["Degraded"].status == "False"
    assert st.observed_generation == 3 and c["Ready"].observed_generation == 3
    assert st.ratio == "1:2" and st.replicas is not None and st.replicas.decode == "2/2"
    assert [p.vendor for p in st.pools] == ["nvidia", "intel"]
    assert [c.type for c in st.conditions] == ["Ready", "Progressing", "Degraded"]


def test_status_not_ready_and_rolling(sample_pools: dict[str, dict]) -> None:
    s = spec()
    st = compute_status(
        spec=s,
        generation=1,
        resolution=resolve(s, sample_pools),
        deployments={"p": dep(1, 0)},
        router=None,
        endpoint="http://x",
        previous=InferenceServiceStatus(),
        now="t0",
    )
    c = conds(st)
    assert c["Ready"].status == "False" and c["Ready"].reason == "ReplicasNotReady"
    assert "p" in c["Ready"].message and "d" in c["Ready"].message and "router" in c["Ready"].message
    assert c["Progressing"].status == "True"


def test_status_reports_reference_problems(sample_pools: dict[str, dict]) -> None:
    s = spec(pools=[{"name": "d", "role": "decode", "acceleratorPool": "missing"}])
    st = compute_status(
        spec=s,
        generation=1,
        resolution=resolve(s, sample_pools),
        deployments={},
        router=None,
        endpoint="http://x",
        previous=InferenceServiceStatus(),
        now="t0",
    )
    c = conds(st)
    assert (c["Ready"].status, c["Ready"].reason) == ("False", "AcceleratorPoolNotFound")
    assert (c["Degraded"].status, c["Degraded"].reason) == ("True", "AcceleratorPoolNotFound")
    assert "'missing'" in c["Ready"].message


def test_last_transition_time_moves_only_on_flips() -> None:
    old = [Condition(type="Ready", status="False", reason="A", last_transition_time="t0")]
    same = merge_condition(old, Condition(type="Ready", status="False", reason="B"), "t1")
    flipped = merge_condition(old, Condition(type="Ready", status="True", reason="C"), "t1")
    assert same.last_transition_time == "t0" and same.reason == "B"
    assert flipped.last_transition_time == "t1"
    kept = set_conditions(
        [Condition(type="MetricsAvailable", status="True", reason="X", last_transition_time="t0")],
        [Condition(type="Ready", status="True", reason="Y")],
        "t1",
    )
    assert [c.type for c in kept] == ["Ready", "MetricsAvailable"]


def test_status_changed_detects_equal_status(sample_pools: dict[str, dict]) -> None:
    s = spec()
    kwargs: dict[str, Any] = dict(
        spec=s,
        generation=1,
        resolution=resolve(s, sample_pools),
        deployments={"p": dep(1, 1), "d": dep(2, 2)},
        router=dep(1, 1),
        endpoint="http://x",
    )
    first = compute_status(previous=InferenceServiceStatus(), now="t0", **kwargs)
    second = compute_status(
        previous=InferenceServiceStatus.model_validate(first.to_wire()), now="t1", **kwargs
    )
    assert not status_changed(first.to_wire(), second)
    assert status_changed(None, second)


@pytest.mark.parametrize(("p", "d", "expected"), [(2, 4, "1:2"), (3, 2, "3:2"), (0, 2, "0:2"), (0, 0, "0:0")])
def test_ratio(p: int, d: int, expected: str) -> None:
    assert ratio(p, d) == expected


def node(name: str, labels: dict[str, str], gpus: str, unschedulable: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": unschedulable},
        "status": {"allocatable": {"habana.ai/gaudi": gpus}},
    }


def pod(node_name: str, gpus: str) -> dict[str, Any]:
    return {
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"requests": {"habana.ai/gaudi": gpus}}}],
        }
    }


def test_pool_status_counts_matching_nodes_and_devices(sample_pools: dict[str, dict]) -> None:
    from tandem.models.accelerator_pool import AcceleratorPoolSpec, AcceleratorPoolStatus
    from tandem.status import compute_pool_status, pool_status_update

    spec = AcceleratorPoolSpec.model_validate(sample_pools["gaudi3"])
    gaudi = {"inference.tandem.dev/accelerator-model": "Gaudi3"}
    nodes = [
        node("g0", gaudi, "8"),
        node("g1", gaudi, "8"),
        node("g2", gaudi, "8", unschedulable=True),  # cordoned: not offered
        node("h0", {"inference.tandem.dev/accelerator-model": "H100-SXM"}, "0"),
    ]
    pods = [pod("g0", "8"), pod("g1", "4"), pod("h0", "8"), pod("g2", "8")]
    st = compute_pool_status(
        spec=spec, generation=2, nodes=nodes, pods=pods, previous=AcceleratorPoolStatus(), now="t"
    )
    assert (st.matching_nodes, st.allocatable_devices, st.allocated_devices) == (2, 16, 12)
    assert st.conditions[0].status == "True" and st.conditions[0].reason == "NodesAvailable"
    empty = compute_pool_status(spec=spec, generation=2, nodes=[], pods=[], previous=st, now="t2")
    assert (
        empty.conditions[0].reason == "NoMatchingNodes" and empty.conditions[0].last_transition_time == "t2"
    )
    body = {
        "metadata": {"name": "gaudi3", "generation": 2},
        "spec": sample_pools["gaudi3"],
        "status": st.to_wire(),
    }
    assert pool_status_update(body, nodes, pods, "t3") is None  # unchanged: nothing to write
    assert pool_status_update(body, nodes, pods[:1], "t3") is not None


def crashing_pod(pool: str, waiting: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {"inference.tandem.dev/pool": pool}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "containerStatuses": [
                {"name": "kv-sidecar", "state": {"running": {}}},
                {"name": "engine", "state": {"waiting": {"reason": waiting}}, "restartCount": 7},
            ]
        },
    }


def test_a_crash_looping_pool_makes_the_service_degraded(sample_pools: dict[str, dict]) -> None:
    s = spec()
    pods = [
        crashing_pod("d", "CrashLoopBackOff"),
        crashing_pod("d", "CrashLoopBackOff"),
        crashing_pod("p", "CrashLoopBackOff", deleting=True),  # an old rollout's pod: ignored
        crashing_pod("p", "ContainerCreating"),  # still starting: not failing
    ]
    st = compute_status(
        spec=s,
        generation=1,
        resolution=resolve(s, sample_pools),
        deployments={"p": dep(1, 1), "d": dep(2, 0)},
        router=dep(1, 1),
        endpoint="http://x",
        previous=InferenceServiceStatus(),
        now="t0",
        pods=pods,
    )
    c = conds(st)
    assert c["Degraded"].status == "True" and c["Degraded"].reason == "PoolCrashLooping"
    assert c["Degraded"].message.startswith("Pool d: 2 pod(s) with container engine in CrashLoopBackOff")
    assert c["Ready"].status == "False" and c["Ready"].reason == "ReplicasNotReady"


def test_image_pull_failures_are_reported_per_pool() -> None:
    from tandem.status import failing_pools

    found = failing_pools([crashing_pod("b", "ImagePullBackOff"), crashing_pod("a", "CrashLoopBackOff")])
    assert list(found) == ["a", "b"]
    assert found["b"][0] == "PoolImagePullFailing" and found["a"][0] == "PoolCrashLooping"
    assert failing_pools([crashing_pod("a", "ContainerCreating")]) == {}


def _between_crashes(pool: str, ready: bool, exit_code: int, state: str = "running") -> dict[str, Any]:
    """A pod whose engine restarted after exiting with ``exit_code`` and now ``state``."""
    return {
        "metadata": {"labels": {"inference.tandem.dev/pool": pool}},
        "status": {
            "containerStatuses": [
                {
                    "name": "engine",
                    "ready": ready,
                    "restartCount": 3,
                    "state": {state: {"reason": "Error"} if state == "terminated" else {}},
                    "lastState": {
                        "terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}
                    },
                }
            ]
        },
    }


def test_a_crash_loop_between_back_offs_still_fails() -> None:
    """The kubelet says CrashLoopBackOff only while it backs off; between two back-offs the
    container runs (or just exited) again. Still failing until it is ready: Degraded and its
    Warning do not flap with every crash cycle."""
    from tandem.status import failing_pools

    for state in ("running", "terminated"):
        found = failing_pools([_between_crashes("d", ready=False, exit_code=1, state=state)])
        assert found["d"][0] == "PoolCrashLooping"
        assert "in CrashLoopBackOff (last exit: Error, code 1);" in found["d"][1]
    assert failing_pools([_between_crashes("d", ready=True, exit_code=1)]) == {}  # recovered
    assert failing_pools([_between_crashes("d", ready=False, exit_code=0)]) == {}  # exited cleanly


def test_the_degraded_message_states_each_failing_pool_once() -> None:
    """`stated_failures` reads back, from the message the Degraded condition joins, each pool's
    failure (the key of its Warning Event): the pool and the waiting reason, not the pod count."""
    from tandem.status import failing_pools, stated_failures

    pods = [
        crashing_pod("a.b", "CrashLoopBackOff"),
        crashing_pod("a.b", "CrashLoopBackOff"),
        crashing_pod("c", "ErrImagePull"),
    ]
    found = failing_pools(pods)
    message = " ".join(m for _, m in found.values())  # as the Degraded condition writes it
    stated = stated_failures(message)
    assert stated == {
        ("a.b", "CrashLoopBackOff"): found["a.b"],
        ("c", "ErrImagePull"): found["c"],
    }
    assert stated_failures("No pod of a pool is failing to run.") == {}


def test_a_crash_loop_states_how_the_container_last_exited() -> None:
    """The Degraded message says how a crash-looping container last ended (the kubelet's
    lastState), so the cause (OOMKilled, an exit code) shows without kubectl describe; the
    restart count is left out, or each crash would rewrite the status. `stated_failures` reads
    the sentence back with and without it (a message an earlier operator wrote)."""
    from tandem.status import failing_pools, stated_failures

    oom = _between_crashes("d", ready=False, exit_code=137)
    oom["status"]["containerStatuses"][0]["lastState"]["terminated"]["reason"] = "OOMKilled"
    backing_off = crashing_pod("p", "CrashLoopBackOff")
    backing_off["status"]["containerStatuses"][1]["lastState"] = {"terminated": {"exitCode": 2}}
    found = failing_pools([oom, backing_off, crashing_pod("x", "CrashLoopBackOff")])
    assert found["d"][1].startswith(
        "Pool d: 1 pod(s) with container engine in CrashLoopBackOff (last exit: OOMKilled, code 137);"
    )
    assert "in CrashLoopBackOff (last exit: code 2);" in found["p"][1]
    assert "in CrashLoopBackOff;" in found["x"][1]  # no lastState: nothing to add
    again = failing_pools(
        [
            {
                **oom,
                "status": {
                    "containerStatuses": [{**oom["status"]["containerStatuses"][0], "restartCount": 9}]
                },
            }
        ]
    )
    assert again["d"] == found["d"]  # another crash, the same message
    message = " ".join(m for _, m in found.values())
    assert set(stated_failures(message)) == {
        ("d", "CrashLoopBackOff"),
        ("p", "CrashLoopBackOff"),
        ("x", "CrashLoopBackOff"),
    }
    assert stated_failures(message)[("d", "CrashLoopBackOff")] == found["d"]


class RejectingKube:
    """apply() refuses one Deployment the way the apiserver or an admission policy does."""

    def __init__(self, refuse: str, status: int) -> None:
        self.refuse, self.status, self.applied = refuse, status, []  # type: ignore[var-annotated]

    def apply(self, manifest: dict[str, Any], field_manager: str = "tandem-operator") -> dict[str, Any]:
        from tandem.kube import KubeError

        if manifest["metadata"]["name"] == self.refuse:
            raise KubeError(self.status, "Invalid", {"message": "denied by policy no-decode: decode is off"})
        self.applied.append(manifest["metadata"]["name"])
        return manifest


def _manifests() -> list[dict[str, Any]]:
    def m(kind: str, name: str, pool: str | None) -> dict[str, Any]:
        labels = {"inference.tandem.dev/pool": pool} if pool else {}
        return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "labels": labels}}

    return [m("ConfigMap", "svc-router", None), m("Deployment", "svc-p", "p"), m("Deployment", "svc-d", "d")]


def test_a_rejected_child_becomes_a_problem_and_the_others_are_applied() -> None:
    import asyncio

    from tandem.reconcile import Outcome, _apply_waves

    kube = RejectingKube("svc-d", 422)
    outcome, live = Outcome(), {}  # type: ignore[var-annotated]
    asyncio.run(_apply_waves(kube, _manifests(), outcome, live, None))  # type: ignore[arg-type]
    assert kube.applied == ["svc-router", "svc-p"] and list(live) == ["p"]
    assert [p.reason for p in outcome.rejected] == ["ChildRejected"]
    assert outcome.rejected[0].message == (
        "the apiserver rejected Deployment ns/svc-d: denied by policy no-decode: decode is off"
    )


def test_other_apply_errors_still_raise_after_the_rest_is_applied() -> None:
    import asyncio

    from tandem.kube import KubeError
    from tandem.reconcile import Outcome, _apply_waves

    kube = RejectingKube("svc-p", 503)
    outcome = Outcome()
    with pytest.raises(KubeError):
        asyncio.run(_apply_waves(kube, _manifests(), outcome, {}, None))  # type: ignore[arg-type]
    assert kube.applied == ["svc-router", "svc-d"] and outcome.rejected == []


def _deployment(name: str, replicas: int | None, managers: dict[str, bool]) -> dict[str, Any]:
    """A Deployment; ``managers``: field manager -> whether its apply set spec.replicas."""
    fields = [
        {
            "manager": m,
            "operation": "Apply",
            "fieldsV1": {"f:spec": {"f:replicas": {}} if owns else {"f:template": {}}},
        }
        for m, owns in managers.items()
    ]
    spec = {} if replicas is None else {"replicas": replicas}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns", "managedFields": fields},
        "spec": spec,
    }


def test_replicas_are_handed_over_only_when_tandem_stops_setting_them() -> None:
    live = [
        _deployment("a", 3, {"tandem-operator": True}),  # Tandem set 3 and now leaves the field
        _deployment("b", 2, {"tandem-operator": False, "kube-controller-manager": True}),  # HPA's
        _deployment("c", 4, {"tandem-operator": True}),  # still set by Tandem
        _deployment("d", 5, {"tandem-operator": True}),  # gone from the desired set: pruned instead
        {"kind": "Service", "metadata": {"name": "a", "namespace": "ns"}, "spec": {}},
    ]
    desired = [
        _deployment("a", None, {}),
        _deployment("b", None, {}),
        _deployment("c", 4, {}),
        {"kind": "Service", "metadata": {"name": "a", "namespace": "ns"}, "spec": {}},
    ]
    out = replicas_handovers(desired, live, "tandem-operator")
    assert out == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a", "namespace": "ns"},
         "spec": {"replicas": 3}},
    ]  # fmt: skip
    # an Update by the same manager (not an apply) or a Deployment being deleted is left alone
    live[0]["metadata"]["managedFields"][0]["operation"] = "Update"
    assert replicas_handovers(desired, live, "tandem-operator") == []
    live[0]["metadata"]["managedFields"][0]["operation"] = "Apply"
    live[0]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert replicas_handovers(desired, live, "tandem-operator") == []


def test_merge_patch_removes_what_the_new_status_dropped() -> None:
    old = {
        "conditions": [{"type": "Ready"}, {"type": "MetricsAvailable"}],
        "lastDecision": {"reason": "ScaledUp", "signals": {"a": "1", "burstFloorRps": "2"}},
        "targetRatio": "2:1",
        "ratio": "1:1",
    }
    new = {
        "conditions": [{"type": "Ready"}],
        "lastDecision": {"reason": "Steady", "signals": {"a": "3"}},
        "ratio": "1:1",
    }
    patch = merge_patch(old, new)
    assert patch["targetRatio"] is None and patch["lastDecision"]["signals"]["burstFloorRps"] is None
    assert apply_merge_patch(old, patch) == new
    assert apply_merge_patch(old, merge_patch(old, {})) == {}
    assert merge_patch(None, new) == new
    # a newer operator's fields, at any depth, are neither removed nor a reason to write again
    status = InferenceServiceStatus(ratio="1:1", replicas=RoleSummary(prefill="1/1"))
    stored = {**status.to_wire(), "fromTheFuture": {"x": 1}}
    stored["replicas"] = {**stored["replicas"], "newer": "2/2"}
    assert not status_changed(stored, status)
    assert status_changed({**stored, "ratio": "1:2"}, status)
    patch = merge_patch(known(InferenceServiceStatus, stored), status.to_wire())
    assert "fromTheFuture" not in patch and "newer" not in patch["replicas"]


def test_every_condition_message_is_a_sentence(sample_pools: dict[str, dict]) -> None:
    """Conditions a user reads (kubectl describe, Argo CD) carry a sentence, also when all is
    well (Degraded=False, Progressing=False, ScalingLimited=False) and when a spec problem's
    own message is a lower-case clause."""
    from tandem.scaling import limited_condition

    s = spec()
    kwargs: dict[str, Any] = {
        "spec": s,
        "generation": 1,
        "deployments": {"p": dep(1, 1), "d": dep(2, 2)},
        "router": dep(1, 1),
        "endpoint": "http://x",
        "previous": InferenceServiceStatus(),
        "now": "t0",
    }
    healthy = compute_status(resolution=resolve(s, sample_pools), **kwargs)
    broken = spec(pools=[{"name": "d", "role": "decode", "acceleratorPool": "missing"}])
    problem = compute_status(**{**kwargs, "spec": broken, "resolution": resolve(broken, sample_pools)})
    seen = [*healthy.conditions, *problem.conditions, limited_condition(None, 1)]
    assert {(c.type, c.reason) for c in seen} >= {
        ("Degraded", "AsExpected"),
        ("Progressing", "RolloutComplete"),
        ("Ready", "AcceleratorPoolNotFound"),
        ("ScalingLimited", "WithinLimits"),
    }
    for c in seen:
        assert is_sentence(c.message), c
