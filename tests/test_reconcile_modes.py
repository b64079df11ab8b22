"""The reconcile under each autoscaling mode, against an in-memory apiserver that keeps
server-side apply's ownership of a Deployment's spec.replicas: a field its only manager stops
applying is reset (to 1 for replicas), and a stale resourceVersion is refused with 409.

What the planner's Autoscale may change: replicas and the router's threshold in planner mode,
nothing in recommend mode, nothing of another mode's decision; and that switching to a mode in
which Tandem stops setting replicas keeps the running count (the handover manager)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

from helpers import EventKube, apply_merge_patch, is_sentence
from tandem import names
from tandem.builders.common import Images
from tandem.kube import KubeError
from tandem.reconcile import reconcile
from tandem.scaling import Autoscale

UID = "uid-1"
MAIN, HANDOVER = names.FIELD_MANAGER, names.REPLICAS_HANDOVER_MANAGER


class SsaKube:
    """One namespace's objects; Deployments remember which managers applied spec.replicas."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.owners: dict[str, set[str]] = {}  # Deployment -> managers owning spec.replicas
        self.calls: list[tuple[str, str]] = []  # (manager, Deployment) in order
        self.version = 0
        self.conflict: str | None = None  # a Deployment an "HPA" scales before the next handover
        self.status: dict[str, Any] = {}  # the InferenceService's, as merge patches left it
        self.forbidden: set[str] = set()  # kinds the operator's RBAC does not cover

    def list_objects(
        self, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        if kind in self.forbidden:
            raise KubeError(403, "Forbidden", {"message": f"cannot list resource {kind}"})
        out = []
        for (k, name), obj in self.objects.items():
            if k != kind or any(
                obj["metadata"].get("labels", {}).get(a) != b for a, b in (labels or {}).items()
            ):
                continue
            obj = copy.deepcopy(obj)
            if kind == "Deployment":
                obj["metadata"]["managedFields"] = [
                    {"manager": m, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
                    for m in sorted(self.owners.get(name, set()))
                ]
            out.append(obj)
        return out

    def apply(self, manifest: dict[str, Any], field_manager: str = MAIN) -> dict[str, Any]:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        live = self.objects.get((kind, name))
        if kind == "Deployment" and field_manager == HANDOVER and name == self.conflict and live:
            live["spec"]["replicas"] += 1  # the HPA scaled it since the reconcile's LIST
            self.owners[name] = {"hpa"}  # an update (the scale subresource) takes the field over
            self.version += 1
            live["metadata"]["resourceVersion"] = str(self.version)
            self.conflict = None
        wanted = manifest["metadata"].get("resourceVersion")
        if wanted is not None and live is not None and wanted != live["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", {"message": "the object has been modified"})
        self.version += 1
        if kind == "Deployment":
            self.calls.append((field_manager, name))
            owners = self.owners.setdefault(name, set())
            replicas = (live or {}).get("spec", {}).get("replicas")
            if "replicas" in manifest.get("spec", {}):
                owners.add(field_manager)
                replicas = manifest["spec"]["replicas"]
            else:
                owners.discard(field_manager)
                if not owners:
                    replicas = 1  # server-side apply drops the field: the default comes back
            if field_manager == HANDOVER:
                assert live is not None
                obj = copy.deepcopy(live)
            else:
                obj = copy.deepcopy(manifest)
            obj["spec"]["replicas"] = replicas
        else:
            obj = copy.deepcopy(manifest)
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(kind, name)] = obj
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self.objects.pop((kind, name), None)

    def patch_status(
        self, kind: str, name: str, namespace: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.status = apply_merge_patch(self.status, status)
        return {}

    def replicas(self) -> dict[str, int]:
        return {n.removeprefix("llama-"): o["spec"]["replicas"] for (k, n), o in self.objects.items()
                if k == "Deployment" and n != "llama-router"}  # fmt: skip

    def threshold(self) -> int:
        doc = json.loads(self.objects[("ConfigMap", "llama-router")]["data"]["router.json"])
        return int(doc["splitThresholdTokens"])


def spec(mode: str) -> dict[str, Any]:
    return {
        "model": {"name": "m", "preset": "llama-3.1-8b"},
        "engine": "sim",
        "pools": [
            {
                "name": "prefill",
                "role": "prefill",
                "acceleratorPool": "b200",
                "replicas": {"min": 1, "max": 6},
            },
            {
                "name": "decode",
                "role": "decode",
                "acceleratorPool": "gaudi3",
                "replicas": {"min": 2, "max": 6},
            },
        ],
        "routing": {"minPromptTokens": 1024},
        "autoscaling": {"mode": mode},
    }


def run(kube: SsaKube, mode: str, pools: dict[str, dict], autoscale: Autoscale | None = None) -> None:
    body = {
        "metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "generation": 1},
        "spec": spec(mode),
        "status": copy.deepcopy(kube.status),
    }
    asyncio.run(
        reconcile(
            body, kube=kube, pools=pools, images=Images(), now="2026-01-01T00:00:00Z", autoscale=autoscale
        )  # type: ignore[arg-type]
    )


def test_only_planner_mode_applies_the_planners_replicas_and_threshold(sample_pools: dict[str, dict]) -> None:
    kube = SsaKube()
    run(kube, "off", sample_pools)
    assert kube.replicas() == {"prefill": 1, "decode": 2} and kube.threshold() == 1024
    recommended = Autoscale(replicas={}, split_threshold=4096, recommended={"prefill": 3}, mode="recommend")
    run(kube, "recommend", sample_pools, recommended)
    assert kube.replicas() == {"prefill": 1, "decode": 2} and kube.threshold() == 1024
    # a decision of recommend mode reaching a reconcile after the switch to planner: ignored
    run(kube, "planner", sample_pools, recommended)
    assert kube.replicas() == {"prefill": 1, "decode": 2} and kube.threshold() == 1024
    planned = Autoscale(replicas={"prefill": 3}, split_threshold=4096, mode="planner")
    run(kube, "planner", sample_pools, planned)
    assert kube.replicas() == {"prefill": 3, "decode": 2} and kube.threshold() == 4096


def test_leaving_replicas_to_others_hands_them_over_before_dropping_the_field(
    sample_pools: dict[str, dict],
) -> None:
    kube = SsaKube()
    run(kube, "planner", sample_pools, Autoscale(replicas={"prefill": 4}, mode="planner"))
    assert kube.replicas() == {"prefill": 4, "decode": 2}
    kube.calls.clear()
    run(kube, "external", sample_pools)
    assert kube.replicas() == {"prefill": 4, "decode": 2}  # not reset to 1
    for pool in ("prefill", "decode"):
        name = f"llama-{pool}"
        assert kube.calls.index((HANDOVER, name)) < kube.calls.index((MAIN, name))
        assert kube.owners[name] == {HANDOVER}
    kube.calls.clear()
    run(kube, "external", sample_pools)
    assert all(manager == MAIN for manager, _ in kube.calls)  # handed over once


def test_a_deployment_scaled_meanwhile_is_left_to_the_scaler(sample_pools: dict[str, dict]) -> None:
    kube = SsaKube()
    run(kube, "off", sample_pools)
    kube.conflict = "llama-decode"
    kube.calls.clear()
    run(kube, "recommend", sample_pools)
    assert (MAIN, "llama-decode") not in kube.calls  # 409: left alone in this reconcile
    assert kube.owners["llama-decode"] == {"hpa"} and kube.replicas()["decode"] == 3  # the HPA's 3
    kube.calls.clear()
    run(kube, "recommend", sample_pools)  # Tandem owns nothing to hand over now: it just drops it
    assert (HANDOVER, "llama-decode") not in kube.calls and (MAIN, "llama-decode") in kube.calls
    assert kube.owners["llama-decode"] == {"hpa"} and kube.replicas() == {"prefill": 1, "decode": 3}


def test_the_previous_modes_planner_status_goes_at_the_switch(sample_pools: dict[str, dict]) -> None:
    from tandem.models.inference_service import Decision as DecisionStatus

    kube = SsaKube()
    decided = Autoscale(
        replicas={"prefill": 2},
        last_decision=DecisionStatus(
            time="t", reason="ScaledUp", message="Scaled up: prefill 1->2.", mode="planner"
        ),
        target_ratio="1:1",
        mode="planner",
    )
    run(kube, "planner", sample_pools, decided)
    assert kube.status["lastDecision"]["reason"] == "ScaledUp" and kube.status["targetRatio"] == "1:1"
    run(kube, "recommend", sample_pools, decided)  # the spec switched before the planner decided again
    assert "lastDecision" not in kube.status and "targetRatio" not in kube.status
    # the same when the operator holds no decision at all (restarted, or took over as leader)
    run(kube, "planner", sample_pools, decided)
    assert kube.status["lastDecision"]["mode"] == "planner"
    run(kube, "recommend", sample_pools, None)
    assert "lastDecision" not in kube.status
    run(kube, "recommend", sample_pools, None)  # and nothing to clear once it is gone
    assert "lastDecision" not in kube.status


def test_a_pair_that_cannot_exchange_kv_waits_for_a_fix_instead_of_rolling_out(
    sample_pools: dict[str, dict],
) -> None:
    pools = copy.deepcopy(sample_pools)
    pools["b200"]["fabric"]["transport"] = "libfabric"  # the decode side (gaudi3) runs UCX
    kube = SsaKube()
    run(kube, "off", pools)
    assert kube.replicas() == {}  # neither side of the pair is rolled out
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    assert (conditions["KVTransferReady"]["status"], conditions["KVTransferReady"]["reason"]) == (
        "False",
        "Incompatible",
    )
    # not "RollingOut" forever: the Deployments never come until the pair is fixed
    assert (conditions["Progressing"]["status"], conditions["Progressing"]["reason"]) == (
        "False",
        "Incompatible",
    )
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Incompatible")
    assert conditions["Degraded"]["status"] == "True"
    assert "different RDMA transports" in conditions["Ready"]["message"]


def test_a_mismatched_pair_with_working_counterparts_is_no_service_problem(
    sample_pools: dict[str, dict],
) -> None:
    """Two prefill and two decode pools, one pair on each RDMA transport: every pool has a
    counterpart it can hand KV to, so all four roll out; only KVTransferReady names the bad pairs."""
    pools = copy.deepcopy(sample_pools)
    for name in ("b200", "mi300x"):
        pools[name]["fabric"]["transport"] = "libfabric"
    doc = spec("off")
    doc["pools"] = [
        {"name": "p-fab", "role": "prefill", "acceleratorPool": "b200"},
        {"name": "p-ucx", "role": "prefill", "acceleratorPool": "h100"},
        {"name": "d-ucx", "role": "decode", "acceleratorPool": "gaudi3"},
        {"name": "d-fab", "role": "decode", "acceleratorPool": "mi300x"},
    ]
    kube = SsaKube()
    body = {"metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "generation": 1}, "spec": doc}
    asyncio.run(reconcile(body, kube=kube, pools=pools, images=Images(), now="2026-01-01T00:00:00Z"))  # type: ignore[arg-type]
    assert set(kube.replicas()) == {"p-fab", "p-ucx", "d-ucx", "d-fab"}
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    assert conditions["KVTransferReady"]["reason"] == "Incompatible"
    assert conditions["Degraded"]["status"] == "False"
    assert conditions["Progressing"]["reason"] != "Incompatible"


def test_rbac_without_disruption_budgets_still_reconciles_the_rest(sample_pools: dict[str, dict]) -> None:
    """A chart from before PodDisruptionBudgets (or rbac.create=false) may not list them: the
    pools are applied without one instead of every reconcile failing."""
    kube = SsaKube()
    kube.forbidden = {"PodDisruptionBudget"}
    run(kube, "off", sample_pools)
    assert kube.replicas() == {"prefill": 1, "decode": 2}
    assert not [n for k, n in kube.objects if k == "PodDisruptionBudget"]
    kube.forbidden = set()
    run(kube, "off", sample_pools)  # granted later: they come
    assert sorted(n for k, n in kube.objects if k == "PodDisruptionBudget") == [
        "llama-decode",
        "llama-prefill",
    ]


def test_an_unreadable_spec_sets_all_three_conditions(sample_pools: dict[str, dict]) -> None:
    """A spec the operator's model rejects (a CRD older or newer than the operator): Ready,
    Progressing and Degraded all say InvalidSpec; no condition is left from before."""
    kube = SsaKube()
    run(kube, "off", sample_pools)  # a readable spec first: Progressing was set then
    doc = spec("off")
    doc["pools"][0]["replicas"] = {"min": "one", "max": 6}
    body = {
        "metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "generation": 2},
        "spec": doc,
        "status": copy.deepcopy(kube.status),
    }
    asyncio.run(reconcile(body, kube=kube, pools=sample_pools, images=Images(), now="2026-01-01T00:01:00Z"))  # type: ignore[arg-type]
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    for kind, status in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
        c = conditions[kind]
        assert (c["status"], c["reason"], c["observedGeneration"]) == (status, "InvalidSpec", 2), kind
    assert conditions["Ready"]["message"].startswith("The spec cannot be read: pools.0.replicas.min")
    assert is_sentence(conditions["Ready"]["message"]) and is_sentence(conditions["Degraded"]["message"])


def test_a_different_spec_problem_posts_again_an_unchanged_one_does_not(
    sample_pools: dict[str, dict],
) -> None:
    """Warning Events for spec problems: one when the problem appears, one for a second, different
    problem of the same reason (InvalidSpec after InvalidSpec: the user fixed the first field),
    none on a resync while the problem stays."""
    from tandem.controller import Controller, Settings

    kube, events = SsaKube(), EventKube()
    controller = Controller(events, Settings())  # type: ignore[arg-type]

    def reconcile_with(field: str, value: Any) -> None:
        doc = spec("off")
        doc["pools"][0]["replicas"] = {"min": 1, "max": 6, field: value}
        body = {
            "metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "generation": 2},
            "spec": doc,
            "status": copy.deepcopy(kube.status),
        }
        outcome = asyncio.run(reconcile(body, kube=kube, pools=sample_pools, images=Images()))  # type: ignore[arg-type]
        asyncio.run(controller._post_events(body, outcome))

    reconcile_with("min", "one")
    reconcile_with("min", "one")  # a resync: nothing new
    reconcile_with("max", "six")  # min fixed, max broken: news, with the same reason
    warnings = [(reason, note.split(": ")[1]) for type_, reason, note in events.events if type_ == "Warning"]
    assert warnings == [("InvalidSpec", "pools.0.replicas.min"), ("InvalidSpec", "pools.0.replicas.max")]


def test_when_one_of_two_spec_problems_is_fixed_the_other_is_not_posted_again(
    sample_pools: dict[str, dict],
) -> None:
    """Ready's message joins every problem, so it changes when one is fixed or added; only a
    problem not stated before posts a Warning then."""
    from tandem.controller import Controller, Settings

    kube, events = SsaKube(), EventKube()
    controller = Controller(events, Settings())  # type: ignore[arg-type]

    def reconcile_on(prefill: str, decode: str, pools: dict[str, dict]) -> list[str]:
        doc = spec("off")
        doc["pools"][0]["acceleratorPool"], doc["pools"][1]["acceleratorPool"] = prefill, decode
        body = {
            "metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "generation": 2},
            "spec": doc,
            "status": copy.deepcopy(kube.status),
        }
        outcome = asyncio.run(reconcile(body, kube=kube, pools=pools, images=Images()))  # type: ignore[arg-type]
        before = len(events.events)
        asyncio.run(controller._post_events(body, outcome))
        return [note for type_, _, note in events.events[before:] if type_ == "Warning"]

    first = reconcile_on("x-pool", "y-pool", sample_pools)
    assert len(first) == 2 and "x-pool" in first[0] and "y-pool" in first[1], first
    with_x = {**sample_pools, "x-pool": sample_pools["b200"]}
    assert reconcile_on("x-pool", "y-pool", with_x) == []  # x fixed: y was told already
    third = reconcile_on("z-pool", "y-pool", with_x)  # a new problem beside the old one
    assert len(third) == 1 and "z-pool" in third[0], third
