"""Pure builders: an InferenceService (resolved) in, the Kubernetes objects it needs out.

No I/O, no kopf, no kubernetes client: the same inputs always give the same manifests.
"""

from __future__ import annotations

from tandem.builders.common import Images, Manifest, ServiceContext, owned_labels, spec_hash
from tandem.builders.kv import blocked_pools, check_compatibility
from tandem.builders.router import (
    INFERENCE_POOL_KIND,
    build_inference_pools,
    build_router_configmap,
    build_router_deployment,
    build_router_role,
    build_router_role_binding,
    build_router_service,
    build_router_service_account,
    router_endpoint,
)
from tandem.builders.workers import build_pool_disruption_budget, build_pool_service, build_worker_deployment


def desired_objects(
    ctx: ServiceContext, split_threshold: int | None = None, *, inference_pools: bool = False
) -> list[Manifest]:
    """Every object the InferenceService should own, in apply order (config before users).
    ``inference_pools``: the cluster serves the Gateway API Inference Extension's InferencePool
    (emitted unless ``routing.inferencePool.mode`` is ``off``)."""
    objects: list[Manifest] = []
    # a prefill or decode pool without a KV-compatible counterpart is not rolled out
    blocked = blocked_pools(ctx.spec, check_compatibility(ctx.spec, ctx.accelerator_pools))
    for pool in ctx.spec.pools:
        if pool.name in blocked:
            continue
        objects.append(build_pool_service(ctx, pool))
        objects.append(build_pool_disruption_budget(ctx, pool))
        objects.append(build_worker_deployment(ctx, pool))
    objects.append(build_router_service_account(ctx))
    objects.append(build_router_role(ctx))
    objects.append(build_router_role_binding(ctx))
    objects.append(build_router_configmap(ctx, split_threshold))
    objects.append(build_router_service(ctx))
    objects.append(build_router_deployment(ctx))
    settings = ctx.spec.routing.inference_pool
    if inference_pools and settings.mode != "off":
        objects += build_inference_pools(
            ctx, settings.endpoint_picker, settings.endpoint_picker_port, settings.failure_mode
        )
    return objects


__all__ = [
    "INFERENCE_POOL_KIND",
    "Images",
    "Manifest",
    "ServiceContext",
    "desired_objects",
    "owned_labels",
    "router_endpoint",
    "spec_hash",
]
