"""Pure builders: an InferenceService (resolved) in, the Kubernetes objects it needs out.

No I/O, no kopf, no kubernetes client: the same inputs always give the same manifests.
"""

from __future__ import annotations

from tandem.builders.common import Images, Manifest, ServiceContext, owned_labels, spec_hash
from tandem.builders.kv import blocked_pools, check_compatibility
from tandem.builders.router import (
    build_router_configmap,
    build_router_deployment,
    build_router_role,
    build_router_role_binding,
    build_router_service,
    build_router_service_account,
    router_endpoint,
)
from tandem.builders.workers import build_pool_service, build_worker_deployment


def desired_objects(ctx: ServiceContext, split_threshold: int | None = None) -> list[Manifest]:
    """Every object the InferenceService should own, in apply order (config before users)."""
    objects: list[Manifest] = []
    # a prefill or decode pool without a KV-compatible counterpart is not rolled out
    blocked = blocked_pools(ctx.spec, check_compatibility(ctx.spec, ctx.accelerator_pools))
    for pool in ctx.spec.pools:
        if pool.name in blocked:
            continue
        objects.append(build_pool_service(ctx, pool))
        objects.append(build_worker_deployment(ctx, pool))
    objects.append(build_router_service_account(ctx))
    objects.append(build_router_role(ctx))
    objects.append(build_router_role_binding(ctx))
    objects.append(build_router_configmap(ctx, split_threshold))
    objects.append(build_router_service(ctx))
    objects.append(build_router_deployment(ctx))
    return objects


__all__ = [
    "Images",
    "Manifest",
    "ServiceContext",
    "desired_objects",
    "owned_labels",
    "router_endpoint",
    "spec_hash",
]
