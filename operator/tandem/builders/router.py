"""The router in front of an InferenceService: config, Deployment and Service.

The router's behaviour (per-request split decision) is the router issue's; here it gets its
image, its config (pools, their Services, the split threshold) and a stable Service.
"""

from __future__ import annotations

import json
from typing import Any

from tandem import names
from tandem.builders.common import Manifest, ServiceContext, child_name, metadata, with_hash
from tandem.planner.capacity import prefill_seconds_per_token
from tandem.planner.types import planner_spec

ROUTER_CONFIG_KEY = "router.json"
# The prompt length the prefill pools' speeds are quoted at: the parts' ratio hardly moves with it
# (compute-bound prefill), and 2,048 tokens is the order of the Azure code trace's prompts.
SPEED_PROMPT_TOKENS = 2048
# The router's saturation limits (`tandem.router.config.Limits`): the prefill pool counts as saturated
# when each replica has this many requests in flight from the router; a mixed replica is free below
# its limit. Optional in the config; written explicitly so `kubectl get cm -o yaml` shows them.
PREFILL_INFLIGHT_PER_REPLICA = 4
MIXED_INFLIGHT_PER_REPLICA = 16

# Gateway API Inference Extension (GIE) interop: one InferencePool per role, so an llm-d router (or
# any GIE gateway) can be used instead of Tandem's. Shape checked against upstream
# kubernetes-sigs/gateway-api-inference-extension api/v1/inferencepool_types.go and shared_types.go
# (tags v1.0.0 to v1.6.0): spec.selector.matchLabels (1 to 64 labels); spec.targetPorts, a list of
# {number} (exactly one in v1.0, up to 8 later: one is valid everywhere); spec.endpointPickerRef
# {group, kind, name, port: {number}, failureMode: FailOpen | FailClose}, where a CEL rule requires
# `port` when kind is Service. (`endpointPickerRef.portNumber` existed only in v1.0.0-rc.1; a
# released v1 CRD rejects it.) endpointPickerRef is required up to v1.5 and optional since v1.6:
# always written.
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
INFERENCE_POOL_KIND = "InferencePool"
DEFAULT_EPP_PORT = 9002  # the port GIE's Endpoint Picker serves its ext-proc gRPC on


def router_name(service: str) -> str:
    return child_name(service, "router")


def router_endpoint(service: str, namespace: str) -> str:
    return f"http://{router_name(service)}.{namespace}.svc:{names.PORT_HTTP}"


def router_labels() -> dict[str, str]:
    return {names.LABEL_NAME: "tandem-router", names.LABEL_COMPONENT: "router"}


def prefill_speeds(ctx: ServiceContext) -> dict[str, float]:
    """Modelled prefill seconds per prompt token of one replica of each prefill pool (at a
    ``SPEED_PROMPT_TOKENS`` prompt, batched at the default token budget), for the router's
    pick among pools of different parts; {} when the model or a part is not known to the
    performance model (the router then balances by request counts)."""
    by_name = {p.accelerator_pool: ctx.accelerator_pools[p.name] for p in ctx.spec.pools}
    try:
        spec = planner_spec(ctx.spec, by_name)
        return {
            p.name: prefill_seconds_per_token(p, spec.model, SPEED_PROMPT_TOKENS)
            for p in spec.by_role("prefill")
        }
    except (KeyError, ValueError):
        return {}


def router_config(ctx: ServiceContext, split_threshold: int | None = None) -> dict[str, Any]:
    pools = []
    speeds = prefill_speeds(ctx)
    for pool in ctx.spec.pools:
        entry: dict[str, Any] = {
            "name": pool.name,
            "role": pool.role,
            "service": child_name(ctx.name, pool.name),
            "port": names.PORT_HTTP,
            "vendor": ctx.accelerator_pools[pool.name].vendor,
        }
        if pool.name in speeds:
            entry["secondsPerPromptToken"] = float(f"{speeds[pool.name]:.4g}")
        pools.append(entry)
    return {
        "model": ctx.spec.model.name,
        "namespace": ctx.namespace,
        "pools": pools,
        "disaggregation": ctx.spec.routing.disaggregation,
        "splitThresholdTokens": ctx.spec.routing.min_prompt_tokens
        if split_threshold is None
        else split_threshold,
        "timeouts": {"connectSeconds": 5, "prefillSeconds": 300, "decodeSeconds": 3600},
        "limits": {
            "prefillInflightPerReplica": PREFILL_INFLIGHT_PER_REPLICA,
            "mixedInflightPerReplica": MIXED_INFLIGHT_PER_REPLICA,
        },
    }


def build_router_configmap(ctx: ServiceContext, split_threshold: int | None = None) -> Manifest:
    text = json.dumps(router_config(ctx, split_threshold), indent=2, sort_keys=True)
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(ctx, router_name(ctx.name), router_labels()),
            "data": {ROUTER_CONFIG_KEY: text},
        }
    )


def build_router_deployment(ctx: ServiceContext) -> Manifest:
    labels = router_labels()
    selector = {names.LABEL_SERVICE: ctx.name, names.LABEL_COMPONENT: "router"}
    container = {
        "name": "router",
        "image": ctx.images.ref(ctx.images.router),
        "args": ["--config", f"/etc/tandem/{ROUTER_CONFIG_KEY}", "--port", str(names.PORT_HTTP)],
        "ports": [{"name": names.PORT_NAME_HTTP, "containerPort": names.PORT_HTTP, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": names.PORT_NAME_HTTP}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": names.PORT_NAME_HTTP}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/tandem", "readOnly": True}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, router_name(ctx.name), labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": {**labels, **selector, names.LABEL_MANAGED_BY: names.MANAGED_BY_VALUE}
                },
                "spec": {
                    # reads its pools' EndpointSlices (build_router_role) to find replicas
                    "serviceAccountName": router_name(ctx.name),
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": router_name(ctx.name)}}],
                    "enableServiceLinks": False,
                },
            },
        },
    }
    return with_hash(manifest)


def build_router_service_account(ctx: ServiceContext) -> Manifest:
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(ctx, router_name(ctx.name), router_labels()),
        }
    )


def build_router_role(ctx: ServiceContext) -> Manifest:
    """The router discovers replicas from EndpointSlices in its own namespace, and nothing else."""
    return with_hash(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(ctx, router_name(ctx.name), router_labels()),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        }
    )


def build_router_role_binding(ctx: ServiceContext) -> Manifest:
    name = router_name(ctx.name)
    return with_hash(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(ctx, name, router_labels()),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
        }
    )


def build_router_service(ctx: ServiceContext) -> Manifest:
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(ctx, router_name(ctx.name), router_labels()),
            "spec": {
                "type": "ClusterIP",
                "selector": {names.LABEL_SERVICE: ctx.name, names.LABEL_COMPONENT: "router"},
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
    )


def inference_pool_name(service: str, role: str) -> str:
    return child_name(service, role)


def build_inference_pools(
    ctx: ServiceContext,
    epp_service: str | None = None,
    epp_port: int = DEFAULT_EPP_PORT,
    failure_mode: str = "FailClose",
) -> list[Manifest]:
    """One GIE ``InferencePool`` per role the service has (``<service>-<role>``), selecting the
    worker pods of that role on the workers' HTTP port, with its Endpoint Picker (EPP) Service
    ``epp_service`` (default ``<service>-epp``; v1 requires one). The operator applies these only
    when the InferencePool CRD exists in the cluster."""
    roles = sorted({pool.role for pool in ctx.spec.pools})
    pools: list[Manifest] = []
    for role in roles:
        labels = {names.LABEL_NAME: "tandem-inference-pool", names.LABEL_ROLE: role}
        pools.append(
            with_hash(
                {
                    "apiVersion": INFERENCE_POOL_API_VERSION,
                    "kind": INFERENCE_POOL_KIND,
                    "metadata": metadata(ctx, inference_pool_name(ctx.name, role), labels),
                    "spec": {
                        "selector": {"matchLabels": {names.LABEL_SERVICE: ctx.name, names.LABEL_ROLE: role}},
                        "targetPorts": [{"number": names.PORT_HTTP}],
                        "endpointPickerRef": {
                            "group": "",
                            "kind": "Service",
                            "name": epp_service or child_name(ctx.name, "epp"),
                            "port": {"number": epp_port},  # not `portNumber` (see above)
                            "failureMode": failure_mode,
                        },
                    },
                }
            )
        )
    return pools
