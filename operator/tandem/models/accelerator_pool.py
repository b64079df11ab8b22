"""AcceleratorPool: one vendor-labelled pool of nodes with accelerators (cluster-scoped)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tandem import names
from tandem.models.common import (
    DECIMAL,
    Condition,
    Model,
    StatusModel,
    Toleration,
    conditions_field,
    rule,
)

Vendor = Literal["nvidia", "amd", "intel", "other"]
# The names users write in spec.model: one per entry of tandem.perf.catalog (a unit test keeps
# the two in step; the catalog's own lookup accepts these spellings).
KNOWN_MODELS: tuple[str, ...] = ("A100", "B200", "Gaudi3", "H100-SXM", "H200", "L40S", "MI300X", "MI325X")


class AcceleratorProfile(Model):
    """Performance figures for an accelerator missing from Tandem's built-in catalog."""

    bf16_tflops: float = Field(gt=0, description="Dense BF16 TFLOPS per device.")
    fp8_tflops: float | None = Field(default=None, gt=0, description="Dense FP8 TFLOPS per device.")
    memory_gi_b: float = Field(gt=0, alias="memoryGiB", description="Device memory in GiB.")
    memory_bandwidth_g_bs: float = Field(
        gt=0, alias="memoryBandwidthGBs", description="Memory bandwidth in GB/s."
    )


class PoolEngineDefaults(Model):
    """Defaults for the inference engine on this pool's workers."""

    image: str | None = Field(
        default=None, description="Worker image; defaults to Tandem's vLLM image for the vendor."
    )
    kv_buffer_device: Literal["cuda", "cpu", "xpu", "hpu"] | None = Field(
        default=None,
        description="Where the engine stages KV blocks for transfer; derived from the vendor when unset.",
    )
    kv_cache_layout: Literal["NHD", "HND"] | None = Field(
        default=None, description="KV cache memory layout of the engine on this hardware."
    )


class RdmaResource(Model):
    name: str = Field(
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9_.-]+$",
        description="Extended resource of the RDMA device plugin, e.g. rdma/rdma_shared_device_a.",
    )
    count: int = Field(default=1, ge=1, le=64, description="How many of it each worker pod requests.")


class Fabric(Model):
    """How KV caches leave this pool's nodes."""

    type: Literal["rdma", "tcp"] = Field(
        default="tcp",
        description="rdma: the nodes have an RDMA NIC that KV transfer may use; tcp: only TCP.",
    )
    rdma_resource: RdmaResource | None = Field(
        default=None,
        description="The RDMA device plugin's resource that workers request (required with type rdma).",
    )
    networks: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Multus networks for the KV-transfer interface (k8s.v1.cni.cncf.io/networks).",
    )
    transport: Literal["ucx", "libfabric"] = Field(
        default="ucx",
        description="NIXL backend for KV transfer: ucx, or libfabric (e.g. for AWS EFA). Both ends of a "
        "prefill -> decode pair must use the same.",
    )
    allow_tcp_fallback: bool = Field(
        default=False, description="Accept TCP when RDMA was asked for but is not what runs."
    )


class AcceleratorPoolSpec(Model):
    vendor: Vendor = Field(
        description="nvidia, amd, intel or other: picks the device resource, the engine image and "
        "KV-transfer defaults."
    )
    model: str = Field(
        min_length=1,
        max_length=63,
        description=f"Accelerator model from Tandem's catalog ({', '.join(KNOWN_MODELS)}) "
        "or a custom name with a profile.",
    )
    profile: AcceleratorProfile | None = Field(
        default=None, description="Performance figures, required for a model outside the catalog."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels that select this pool's nodes; workers get them as required node affinity.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=16,
        description="Tolerations workers on this pool get, e.g. for the vendor's device taint.",
    )
    resource_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9_.-]+$",
        description="Device resource; defaults to nvidia.com/gpu, amd.com/gpu or habana.ai/gaudi by vendor.",
    )
    devices_per_node: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Devices on one node; a pool's tensorParallelSize may not exceed it "
        "(one pod per replica).",
    )
    cost_per_device_hour: str | None = Field(
        default=None, pattern=DECIMAL, description="Price of one device for one hour, a decimal string."
    )
    engine: PoolEngineDefaults = Field(
        default_factory=PoolEngineDefaults, description="Defaults for the engine on this pool's workers."
    )
    fabric: Fabric = Field(default_factory=Fabric, description="How KV caches leave this pool's nodes.")

    def effective_resource_name(self) -> str:
        if self.resource_name:
            return self.resource_name
        return names.RESOURCE_BY_VENDOR.get(self.vendor, "nvidia.com/gpu")

    def price_per_device_hour(self) -> float | None:
        return float(self.cost_per_device_hour) if self.cost_per_device_hour is not None else None


SPEC_RULES = [
    rule(
        "self.model in " + str(list(KNOWN_MODELS)) + " || has(self.profile)",
        "model must be one of Tandem's catalog ("
        + ", ".join(KNOWN_MODELS)
        + "), or come with a profile (bf16Tflops, memoryGiB, memoryBandwidthGBs)",
    ),
    rule(
        "self.vendor != 'other' || has(self.resourceName)",
        "vendor 'other' needs an explicit resourceName (the device plugin's extended resource)",
    ),
    rule(
        "self.fabric.type != 'rdma' || has(self.fabric.rdmaResource)",
        "fabric type rdma needs fabric.rdmaResource (the RDMA device plugin's resource)",
    ),
]


class AcceleratorPoolStatus(StatusModel):
    observed_generation: int | None = None
    matching_nodes: int | None = None
    allocatable_devices: int | None = None
    allocated_devices: int | None = None
    conditions: list[Condition] = conditions_field()


class AcceleratorPool(Model):
    api_version: Literal["inference.tandem.dev/v1alpha1"] = "inference.tandem.dev/v1alpha1"
    kind: Literal["AcceleratorPool"] = "AcceleratorPool"
    spec: AcceleratorPoolSpec
