"""The Kubernetes API adapter: the only module that talks to the apiserver for reconciling.

A thin, synchronous layer over the official client's transport (auth, TLS, kubeconfig and
in-cluster config come from the ``kubernetes`` package) that speaks plain dicts, so builders and
status code never see client model classes. Async callers run it in a thread (``asyncio.to_thread``).
Every call is counted by verb, which is how tests prove that a no-op reconcile writes nothing.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import kubernetes

from tandem import names
from tandem.telemetry import KUBE_REQUESTS

# kind -> (API path prefix, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "Pod": ("/api/v1", "pods", True),
    "Node": ("/api/v1", "nodes", False),
    names.KIND_SERVICE: (f"/apis/{names.API_VERSION}", names.PLURAL_SERVICE, True),
    names.KIND_POOL: (f"/apis/{names.API_VERSION}", names.PLURAL_POOL, False),
    # Gateway API Inference Extension; optional: owned only where the cluster serves it
    "InferencePool": ("/apis/inference.networking.k8s.io/v1", "inferencepools", True),
}
OWNED_KINDS = (
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Service",
    "PodDisruptionBudget",
    "Deployment",
)
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read


class KubeError(Exception):
    def __init__(self, status: int, reason: str, body: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.body = dict(body or {})
        super().__init__(f"{status} {reason}: {self.body.get('message', '')}")

    @property
    def namespace_gone(self) -> bool:
        """The namespace or the InferenceService itself is gone or going: nothing to reconcile."""
        details = self.body.get("details") or {}
        message = str(self.body.get("message", ""))
        return (self.status == 404 and details.get("kind") in ("namespaces", names.PLURAL_SERVICE)) or (
            self.status == 403 and "because it is being terminated" in message
        )

    @property
    def retryable(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


def load_config() -> kubernetes.client.Configuration:
    """In-cluster config when running in a pod, else the current kubeconfig."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # as many connections as the operator's API threads (handlers.startup), so none is discarded
    configuration.connection_pool_maxsize = 16
    return configuration


def path_of(kind: str, namespace: str | None = None, name: str | None = None, subresource: str = "") -> str:
    prefix, plural, namespaced = KINDS[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class Kube:
    def __init__(self, configuration: kubernetes.client.Configuration | None = None) -> None:
        self.api = kubernetes.client.ApiClient(configuration or load_config())
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def writes(self) -> int:
        with self._lock:
            return sum(n for verb, n in self.calls.items() if verb in WRITE_VERBS)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        with self._lock:
            self.calls[method] += 1
        KUBE_REQUESTS.labels(method, _kind_of(path)).inc()
        serialized = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*serialized, _request_timeout=REQUEST_TIMEOUT)
        except kubernetes.client.ApiException as exc:  # non-2xx raised by the transport
            payload = _json(exc.body)
            raise KubeError(exc.status or 0, exc.reason or "", payload) from None
        data = response.read()  # type: ignore[no-untyped-call]
        payload = _json(data)
        if not 200 <= response.status <= 299:
            raise KubeError(response.status, response.reason or "", payload)
        return payload

    # reads
    def list_objects(
        self, kind: str, namespace: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query: list[tuple[str, str]] = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))))
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            q = [*query, ("limit", "500")] + ([("continue", cont)] if cont else [])
            page = self.request("GET", path_of(kind, namespace), query=q)
            group_version = page.get("apiVersion", "v1")
            for item in page.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", group_version)
                items.append(item)
            cont = page.get("metadata", {}).get("continue", "")
            if not cont:
                return items

    def list_running_pods(self) -> list[dict[str, Any]]:
        """Every pod in the cluster that holds devices: bound to a node and not finished."""
        query = [
            ("fieldSelector", "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"),
            ("limit", "500"),
        ]
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            page = self.request("GET", path_of("Pod"), query=query + ([("continue", cont)] if cont else []))
            items += page.get("items", [])
            cont = page.get("metadata", {}).get("continue", "")
            if not cont:
                return items

    def serves(self, kind: str) -> bool:
        """Whether the apiserver serves ``kind``'s resource (API discovery of its group version):
        False when the group version is unknown (404), e.g. a CRD that is not installed."""
        prefix, plural, _ = KINDS[kind]
        try:
            doc = self.request("GET", prefix)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in doc.get("resources", []))

    # writes
    def apply(self, manifest: Mapping[str, Any], field_manager: str = names.FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply with Tandem's field manager (``field_manager``: another of Tandem's,
        `names.REPLICAS_HANDOVER_MANAGER`), taking fields back from hand edits."""
        meta = manifest["metadata"]
        return self.request(
            "PATCH",
            path_of(manifest["kind"], meta.get("namespace"), meta["name"]),
            body=apply_body(manifest),
            query=[("fieldManager", field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        try:
            self.request(
                "DELETE",
                path_of(kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except KubeError as exc:
            if exc.status != 404:
                raise

    def patch_status(
        self, kind: str, name: str, namespace: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        return self.request(
            "PATCH",
            path_of(kind, namespace, name, "status"),
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )


# DEL and the C1 controls: json.dumps(ensure_ascii=False) leaves them raw, and raw they are invalid YAML
_YAML_UNSAFE = re.compile("[\x7f-\x9f]")


def apply_body(manifest: Mapping[str, Any]) -> str:
    """A server-side apply body. The apply-patch content type is YAML, so: non-ASCII text as UTF-8
    (YAML rejects JSON's surrogate-pair escapes for characters beyond the BMP), and the control
    characters JSON leaves raw escaped (YAML rejects them raw)."""
    text = json.dumps(manifest, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json(data: Any) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (TypeError, ValueError):
        return {"message": str(data)[:500]}
    return value if isinstance(value, dict) else {"value": value}


def _kind_of(path: str) -> str:
    """The resource plural of a request path, for metrics labels."""
    parts = [p for p in path.split("/") if p]
    for plural in (
        "deployments",
        "services",
        "configmaps",
        "pods",
        "nodes",
        "events",
        "inferenceservices",
        "acceleratorpools",
        "inferencepools",
    ):
        if plural in parts:
            return plural
    return "other"
