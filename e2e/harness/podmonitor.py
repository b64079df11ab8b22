"""A prometheus-operator PodMonitor as the Prometheus scrape config prometheus-operator would
generate from it, so a real Prometheus can discover pods on the local cluster with it.

There is no prometheus-operator here: this follows what its config generator writes for a
PodMonitor (prometheus-operator pkg/prometheus/promcfg.go, documented in its API reference:
`job` is ``<namespace>/<name>``, the `namespace`, `pod`, `container` and `endpoint` target labels
are added, the selector and port become `keep` rules, then the PodMonitor's own relabelings
apply). Only the fields the chart's PodMonitor uses are translated; any other field fails loudly
rather than being ignored.

Debian's Prometheus is built without Kubernetes service discovery, so the e2e test discovers the
pods itself: `pod_target_groups` turns pods read from the apiserver into file_sd target groups
carrying the `__meta_kubernetes_*` labels Prometheus' kubernetes_sd (role pod) documents, and
`with_file_sd` swaps the discovery of a generated scrape config for them. The relabelling that
turns them into target labels is then Prometheus' own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SUPPORTED_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "relabelings", "honorLabels"}
SUPPORTED_RELABEL_FIELDS = {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"}


def sanitize(label: str) -> str:
    """A Kubernetes label name as it appears in __meta_kubernetes_pod_label_<name>."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _selector_rules(selector: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        name = sanitize(key)
        rules.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{name}",
                    f"__meta_kubernetes_pod_labelpresent_{name}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        name = sanitize(expr["key"])
        present = f"__meta_kubernetes_pod_labelpresent_{name}"
        op = expr["operator"]
        if op == "Exists":
            rules.append({"action": "keep", "source_labels": [present], "regex": "true"})
        elif op == "DoesNotExist":
            rules.append({"action": "drop", "source_labels": [present], "regex": "true"})
        elif op in ("In", "NotIn"):
            values = "|".join(re.escape(v) for v in expr["values"])
            rules.append(
                {
                    "action": "keep" if op == "In" else "drop",
                    "source_labels": [f"__meta_kubernetes_pod_label_{name}", present],
                    "regex": f"({values});true",
                }
            )
        else:
            raise ValueError(f"unknown selector operator {op!r}")
    return rules


def _relabel(rule: dict[str, Any]) -> dict[str, Any]:
    unknown = set(rule) - SUPPORTED_RELABEL_FIELDS
    if unknown:
        raise ValueError(f"relabeling fields not translated: {sorted(unknown)}")
    snake = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "regex": "regex",
        "replacement": "replacement",
        "action": "action",
        "separator": "separator",
    }
    return {snake[k]: v for k, v in rule.items()}


def scrape_configs(pod_monitor: dict[str, Any], kubeconfig: Path | str) -> list[dict[str, Any]]:
    """One scrape config per endpoint of ``pod_monitor``, discovering pods through the apiserver
    of ``kubeconfig`` (Prometheus' kubernetes_sd_configs.kubeconfig_file)."""
    meta, spec = pod_monitor["metadata"], pod_monitor["spec"]
    job = f"{meta['namespace']}/{meta['name']}"
    sd: dict[str, Any] = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
    ns_selector = spec.get("namespaceSelector") or {}
    if not ns_selector.get("any"):
        sd["namespaces"] = {"names": list(ns_selector.get("matchNames") or [meta["namespace"]])}
    out = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        unknown = set(endpoint) - SUPPORTED_ENDPOINT_FIELDS
        if unknown:
            raise ValueError(f"podMetricsEndpoints fields not translated: {sorted(unknown)}")
        rules = _selector_rules(spec.get("selector") or {})
        rules += [
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": job},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        rules += [_relabel(r) for r in endpoint.get("relabelings") or []]
        config: dict[str, Any] = {
            "job_name": f"podMonitor/{job}/{i}",
            "honor_labels": bool(endpoint.get("honorLabels", False)),
            "metrics_path": endpoint.get("path", "/metrics"),
            "kubernetes_sd_configs": [sd],
            "relabel_configs": rules,
        }
        if "interval" in endpoint:
            config["scrape_interval"] = endpoint["interval"]
        if "scrapeTimeout" in endpoint:
            config["scrape_timeout"] = endpoint["scrapeTimeout"]
        out.append(config)
    return out


def with_file_sd(config: dict[str, Any], files: str) -> dict[str, Any]:
    """``config`` discovering from file_sd ``files`` instead of the apiserver."""
    out = {k: v for k, v in config.items() if k != "kubernetes_sd_configs"}
    out["file_sd_configs"] = [{"files": [files], "refresh_interval": "1s"}]
    return out


def pod_target_groups(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One file_sd target group per container port of each pod that has an IP, labelled as
    kubernetes_sd's pod role labels it (the labels the chart's relabelling reads and a few
    more: namespace, pod name, IP, phase, node, container name, port name and number)."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        base = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": (pod.get("spec") or {}).get("nodeName", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            base[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
            base[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                labels = {
                    **base,
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                }
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return groups
