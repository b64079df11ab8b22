"""Pieces every builder shares: the context a build runs in, labels, owner references, hashing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tandem import names
from tandem.models.accelerator_pool import AcceleratorPoolSpec
from tandem.models.inference_service import InferenceServiceSpec, PoolSpec

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Images:
    """Image references the operator deploys; the tag defaults to the operator's version."""

    registry: str = names.IMAGE_REGISTRY
    tag: str = "0.1.0"
    # engine -> vendor -> image name under the registry
    engine_images: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "vllm": {"nvidia": "vllm-cuda", "amd": "vllm-rocm", "intel": "vllm-gaudi", "other": "vllm-cuda"},
            "sglang": {
                "nvidia": "sglang-cuda",
                "amd": "sglang-rocm",
                "intel": "sglang-cuda",
                "other": "sglang-cuda",
            },
            "sim": {
                "nvidia": "sim-worker",
                "amd": "sim-worker",
                "intel": "sim-worker",
                "other": "sim-worker",
            },
        }
    )
    router: str = "router"

    def ref(self, name: str) -> str:
        return f"{self.registry}/{name}:{self.tag}"

    def engine(self, engine: str, vendor: str) -> str:
        return self.ref(self.engine_images[engine][vendor])


@dataclass(frozen=True)
class ServiceContext:
    """Everything a builder needs about one InferenceService, already resolved and validated."""

    name: str
    namespace: str
    uid: str
    spec: InferenceServiceSpec
    # pool name -> the AcceleratorPool spec it references
    accelerator_pools: dict[str, AcceleratorPoolSpec]
    # pool name -> replicas to run (None: leave the field to someone else, e.g. an HPA)
    replicas: dict[str, int | None]
    images: Images = field(default_factory=Images)

    def pool(self, pool_name: str) -> PoolSpec:
        for p in self.spec.pools:
            if p.name == pool_name:
                return p
        raise KeyError(pool_name)


def child_name(service: str, suffix: str) -> str:
    return f"{service}-{suffix}"


def owned_labels(service: str) -> dict[str, str]:
    """The labels that mark an object as owned by one InferenceService (used to prune)."""
    return {names.LABEL_MANAGED_BY: names.MANAGED_BY_VALUE, names.LABEL_SERVICE: service}


def owner_reference(ctx: ServiceContext) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND_SERVICE,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(ctx: ServiceContext, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": {**owned_labels(ctx.name), **labels},
        "ownerReferences": [owner_reference(ctx)],
    }


def spec_hash(manifest: Manifest) -> str:
    """A stable hash of a manifest's content, stored as an annotation for humans and tooling."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_hash(manifest: Manifest) -> Manifest:
    digest = spec_hash(manifest)
    annotations = manifest["metadata"].setdefault("annotations", {})
    annotations[names.ANNOTATION_SPEC_HASH] = digest
    return manifest
