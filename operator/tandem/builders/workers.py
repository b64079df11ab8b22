"""Worker Deployments and Services: one of each per pool of an InferenceService."""

from __future__ import annotations

from typing import Any

from tandem import names
from tandem.builders.common import Manifest, ServiceContext, child_name, metadata, with_hash
from tandem.builders.engine import engine_args
from tandem.builders.kv import inject_sidecar, pool_profile
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import PoolSpec


def pool_labels(ctx: ServiceContext, pool: PoolSpec, accel: AcceleratorPoolSpec) -> dict[str, str]:
    return {
        names.LABEL_NAME: "tandem-worker",
        names.LABEL_COMPONENT: f"{pool.role}-worker",
        names.LABEL_POOL: pool.name,
        names.LABEL_ROLE: pool.role,
        names.LABEL_VENDOR: accel.vendor,
        names.LABEL_ACCELERATOR_POOL: pool.accelerator_pool,
        names.LABEL_LLMD_ROLE: names.LLMD_ROLE_BY_ROLE[pool.role],
    }


def selector_labels(ctx: ServiceContext, pool: PoolSpec) -> dict[str, str]:
    """Immutable selector: never include anything that can change (vendor, accelerator pool)."""
    return {names.LABEL_SERVICE: ctx.name, names.LABEL_POOL: pool.name}


def node_affinity(accel: AcceleratorPoolSpec) -> dict[str, Any] | None:
    if not accel.node_selector:
        return None
    expressions = [
        {"key": key, "operator": "In", "values": [value]}
        for key, value in sorted(accel.node_selector.items())
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def _quantity(value: int | str) -> str:
    return str(value)


def container_resources(pool: PoolSpec, accel: AcceleratorPoolSpec) -> dict[str, dict[str, str]]:
    """The device request (tensorParallelSize devices) merged with the user's overrides."""
    device = {accel.effective_resource_name(): str(pool.tensor_parallel_size)}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if pool.resources is not None:
        requests.update({k: _quantity(v) for k, v in (pool.resources.requests or {}).items()})
        limits.update({k: _quantity(v) for k, v in (pool.resources.limits or {}).items()})
    # extended resources must be equal in requests and limits; the device count is not overridable
    requests.update(device)
    limits.update(device)
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def worker_env(ctx: ServiceContext, pool: PoolSpec, accel: AcceleratorPoolSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "TANDEM_SERVICE", "value": ctx.name},
        {"name": "TANDEM_POOL", "value": pool.name},
        {"name": "TANDEM_ROLE", "value": pool.role},
        {"name": "TANDEM_ACCELERATOR", "value": accel.model},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
    ]
    user_names = {e.name for e in pool.env}
    env = [e for e in env if e["name"] not in user_names]
    env += [e.to_wire() for e in pool.env]
    return env


def _probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": names.PORT_NAME_HTTP, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
    }


def build_worker_deployment(ctx: ServiceContext, pool: PoolSpec) -> Manifest:
    accel = ctx.accelerator_pools[pool.name]
    labels = pool_labels(ctx, pool, accel)
    selector = selector_labels(ctx, pool)
    image = pool.image or accel.engine.image or ctx.images.engine(ctx.spec.engine, accel.vendor)
    profile = pool_profile(ctx.spec, pool, ctx.accelerator_pools)
    container: dict[str, Any] = {
        "name": "engine",
        "image": image,
        "command": engine_args(ctx.spec, pool, accel, profile),
        "ports": [{"name": names.PORT_NAME_HTTP, "containerPort": names.PORT_HTTP, "protocol": "TCP"}],
        "env": worker_env(ctx, pool, accel),
        "resources": container_resources(pool, accel),
        # loading weights can take many minutes; liveness only starts counting after startup
        "startupProbe": _probe("/health", period=10, failures=180),
        "readinessProbe": _probe("/health", period=5, failures=3),
        "livenessProbe": _probe("/health", period=10, failures=6, timeout=10),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "tolerations": [t.to_wire() for t in accel.tolerations],
        "terminationGracePeriodSeconds": 60,
        # tensor-parallel workers exchange activations through shared memory
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "enableServiceLinks": False,
    }
    affinity = node_affinity(accel)
    if affinity:
        pod_spec["affinity"] = affinity
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": inject_sidecar(
            {"metadata": {"labels": {**labels, **selector}}, "spec": pod_spec}, profile, pool.role, ctx.images
        ),
    }
    replicas = ctx.replicas.get(pool.name)
    if replicas is not None:
        spec["replicas"] = replicas
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, child_name(ctx.name, pool.name), labels),
        "spec": spec,
    }
    return with_hash(manifest)


def build_pool_service(ctx: ServiceContext, pool: PoolSpec) -> Manifest:
    accel = ctx.accelerator_pools[pool.name]
    manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, child_name(ctx.name, pool.name), pool_labels(ctx, pool, accel)),
        "spec": {
            # Headless: the router picks individual replicas by their load, so a virtual IP that
            # load-balances blindly would only invite bypassing it (and costs a service IP).
            "type": "ClusterIP",
            "clusterIP": "None",
            "selector": selector_labels(ctx, pool),
            "ports": [
                {
                    "name": names.PORT_NAME_HTTP,
                    "port": names.PORT_HTTP,
                    "targetPort": names.PORT_NAME_HTTP,
                    "protocol": "TCP",
                }
            ],
        },
    }
    return with_hash(manifest)


def build_pool_disruption_budget(ctx: ServiceContext, pool: PoolSpec) -> Manifest:
    """The pool's PodDisruptionBudget: a node drain or the cluster autoscaler evicts at most
    ``maxUnavailable`` of its replicas at once, so a maintenance pass does not take a pool of
    several replicas down at once (one decode pool gone is the whole split path gone); a
    one-replica pool still goes. Never 0: that would block drains for good. The planner's own
    scale-downs are not evictions and are not limited."""
    accel = ctx.accelerator_pools[pool.name]
    manifest = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ctx, child_name(ctx.name, pool.name), pool_labels(ctx, pool, accel)),
        "spec": {
            "maxUnavailable": 1 if pool.max_unavailable is None else pool.max_unavailable,
            "selector": {"matchLabels": selector_labels(ctx, pool)},
            # a replica that is not Ready yet (loading weights) may always be evicted
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    return with_hash(manifest)
