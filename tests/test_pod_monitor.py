"""The chart's PodMonitor against the pods the builders make: it selects every worker and router
pod of an InferenceService and gives them the target labels the planner reads (namespace,
service, pool, role; a router none of pool and role). The relabelling is evaluated here by a
small model of Prometheus' (keep, drop, replace); e2e/test_pod_monitor.py runs the same config
in a real Prometheus against pods on the local cluster."""

from __future__ import annotations

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import copy
import re
from typing import Any

import pytest
from e2e.harness import podmonitor
from e2e.harness.chart import find, render
from tests.helpers import make_ctx

from tandem.builders import desired_objects


def pod_monitor(*set_values: str) -> dict[str, Any]:
    (pm,) = find(render(set_values=["metrics.podMonitor.enabled=true", *set_values]), "PodMonitor")
    return pm


def discovered(namespace: str, pod: str, labels: dict[str, str], container: str, port: str) -> dict[str, str]:
    """The meta labels Prometheus' kubernetes_sd (role pod) gives one container port."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port,
        "job": "from-config",
    }
    for key, value in labels.items():
        name = podmonitor.sanitize(key)
        meta[f"__meta_kubernetes_pod_label_{name}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{name}"] = "true"
    return meta


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, drop, replace), None when the target is dropped; then
    the `__` labels go and empty labels are removed, as Prometheus does for target labels."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[rule["target_label"]] = match.expand(rule.get("replacement", r"\1").replace("$1", r"\1"))
    return {k: v for k, v in labels.items() if not k.startswith("__") and v}


def targets(pm: dict[str, Any], objects: list[dict[str, Any]], namespace: str) -> dict[str, dict[str, str]]:
    """Deployment name -> the labels of its pods' scrape target (kept ones only)."""
    (config,) = podmonitor.scrape_configs(pm, "/dev/null")
    out: dict[str, dict[str, str]] = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        template = obj["spec"]["template"]
        for c in template["spec"]["containers"]:
            for port in c.get("ports", []):
                meta = discovered(namespace, "pod-1", template["metadata"]["labels"], c["name"], port["name"])
                got = relabel(meta, config["relabel_configs"])
                if got is not None:
                    # one target per pod: a second port scraped would count its series twice
                    assert obj["metadata"]["name"] not in out, (obj["metadata"]["name"], c["name"], port)
                    out[obj["metadata"]["name"]] = got
    return out


POOL_NAMES = {"prefill": "long", "decode": "gen", "mixed": "short"}  # unlike the roles


def test_workers_and_router_get_the_planners_labels(
    sample_service: dict, sample_pools: dict[str, dict]
) -> None:
    spec = copy.deepcopy(sample_service["spec"])
    for pool in spec["pools"]:
        pool["name"] = POOL_NAMES[pool["role"]]
    objects = desired_objects(make_ctx(spec, sample_pools))
    got = targets(pod_monitor(), objects, "team-a")
    assert set(got) == {"llama-long", "llama-gen", "llama-short", "llama-router"}
    for pool in spec["pools"]:
        target = got[f"llama-{pool['name']}"]
        assert {k: target[k] for k in ("namespace", "service", "pool", "role", "accelerator_pool")} == {
            "namespace": "team-a",
            "service": "llama",
            "pool": pool["name"],
            "role": pool["role"],
            "accelerator_pool": pool["acceleratorPool"],
        }
    router = got["llama-router"]
    assert router["namespace"] == "team-a" and router["service"] == "llama"
    # the router's own `pool` label on tandem_router_dispatched_total must survive the scrape
    assert "pool" not in router and "role" not in router


def test_other_pods_are_not_scraped() -> None:
    meta = discovered(
        "team-a", "x", {"app": "something", "inference.tandem.dev/service": "llama"}, "c", "http"
    )
    assert relabel(meta, podmonitor.scrape_configs(pod_monitor(), "/dev/null")[0]["relabel_configs"]) is None


def test_namespaces_follow_watch_namespaces() -> None:
    assert pod_monitor()["spec"]["namespaceSelector"] == {"any": True}
    pm = pod_monitor("watchNamespaces={team-a,team-b}")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (config,) = podmonitor.scrape_configs(pm, "/k")
    assert config["kubernetes_sd_configs"] == [
        {"role": "pod", "kubeconfig_file": "/k", "namespaces": {"names": ["team-a", "team-b"]}}
    ]


def test_off_by_default() -> None:
    assert find(render(), "PodMonitor") == []


def test_translation_refuses_fields_it_does_not_know() -> None:
    pm = pod_monitor()
    pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"] = [{"action": "drop"}]
    with pytest.raises(ValueError, match="metricRelabelings"):
        podmonitor.scrape_configs(pm, "/k")
