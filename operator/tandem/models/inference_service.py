"""InferenceService: a model served by prefill, decode and mixed pools on AcceleratorPools."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema, field_validator

from tandem.models.common import (
    DECIMAL,
    DNS_LABEL,
    Condition,
    EnvVar,
    Model,
    ResourceRequirements,
    StatusModel,
    conditions_field,
    rule,
)
from tandem.perf.models import MODEL_PRESETS

Role = Literal["prefill", "decode", "mixed"]
Engine = Literal["vllm", "sglang", "sim"]
Dtype = Literal["float16", "bfloat16", "fp8", "auto"]

PERCENT = r"([1-9][0-9]?|100)%"
MAX_UNAVAILABLE_MESSAGE = (
    "maxUnavailable must be a number of at least 1 or a percentage from 1% to 100% "
    "(0 would block node drains for good)"
)

MAX_POOLS = 8
MAX_SERVICE_NAME = 42  # + "-" + a 20-character pool name stays a 63-character DNS label
MAX_POOL_NAME = 20


class Architecture(Model):
    """A model's shape, for models without a preset."""

    parameters_billions: float = Field(gt=0, description="Total parameters, in billions.")
    active_parameters_billions: float | None = Field(
        default=None, gt=0, description="Parameters active per token (mixture-of-experts), in billions."
    )
    layers: int = Field(ge=1, le=1024, description="Transformer layers.")
    hidden_size: int = Field(ge=1, description="Hidden (model) dimension.")
    kv_heads: int = Field(ge=1, description="Key/value heads (fewer than attention heads with GQA).")
    head_dim: int = Field(ge=1, description="Dimension of one attention head.")
    dtype: Dtype = Field(default="bfloat16", description="Weights' and KV cache's data type.")


class ModelSpec(Model):
    name: str = Field(
        min_length=1, max_length=253, description="Served model name, e.g. meta-llama/Llama-3.1-8B-Instruct."
    )
    source: str | None = Field(
        default=None, description="Where workers load weights from (hf://, s3://, pvc://...)."
    )
    preset: str | None = Field(default=None, description="A known architecture, e.g. llama-3.1-8b.")
    architecture: Architecture | None = Field(
        default=None, description="The model's shape, for a model without a preset (exactly one of the two)."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest context in tokens (vLLM --max-model-len, SGLang --context-length).",
    )


class Replicas(Model):
    min: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas: what autoscaling off pins the pool to, external and recommend "
        "start with, and the planner never goes below (unset: 1).",
    )
    max: int = Field(default=1, ge=0, le=1000, description="Most replicas the planner may run (unset: 1).")


class PoolSpec(Model):
    name: str = Field(
        pattern=DNS_LABEL,
        max_length=MAX_POOL_NAME,
        description="Unique within the service; names its Deployment and Service (<service>-<name>).",
    )
    role: Role = Field(
        description="prefill: builds KV caches and hands them to a decode pool; decode: generates "
        "from handed-over KV caches; mixed: serves whole requests (short prompts)."
    )
    accelerator_pool: str = Field(min_length=1, max_length=253, description="Name of an AcceleratorPool.")
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="Devices per replica (one pod), a power of two (unset: 1)."
    )
    replicas: Replicas = Field(
        default_factory=Replicas, description="Bounds on the pool's replicas (unset: min 1, max 1)."
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Extra requests and limits of the worker container (CPU, memory...); the "
        "device count always comes from tensorParallelSize.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Environment variables of the worker container; they win over Tandem's own.",
    )
    args: list[str] = Field(default_factory=list, max_length=64, description="Extra engine arguments.")
    image: str | None = Field(default=None, description="Overrides the AcceleratorPool's engine image.")
    # No schema default: a default inside a list item makes every client-side re-apply of an
    # unchanged manifest "configured" (and GitOps diffs noisy); the builder uses 1 when unset.
    max_unavailable: Annotated[
        int | str | None,
        # maxLength bounds the CEL rule's cost (the apiserver refuses an unbounded string's regex)
        WithJsonSchema({"x-kubernetes-int-or-string": True, "maxLength": 4}),
    ] = Field(
        default=None,
        description="Most replicas of the pool a voluntary disruption (a node drain, the cluster "
        "autoscaler) may evict at once: a number of at least 1, or a percentage such as 25% "
        "(unset: 1). Tandem keeps a PodDisruptionBudget per pool with it.",
    )

    @field_validator("max_unavailable")
    @classmethod
    def _disruption_allowed(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(MAX_UNAVAILABLE_MESSAGE)
        if isinstance(value, str) and not re.fullmatch(PERCENT, value):
            raise ValueError(MAX_UNAVAILABLE_MESSAGE)
        return value


class Slo(Model):
    ttft_seconds: float = Field(default=2.0, gt=0, description="Time-to-first-token target.")
    itl_seconds: float = Field(default=0.1, gt=0, description="Inter-token-latency target.")
    attainment: float = Field(default=0.9, gt=0, le=1, description="Share of requests that must meet both.")


class Budget(Model):
    max_devices: int | None = Field(
        default=None,
        ge=0,
        description="Most accelerator devices (replicas x tensorParallelSize, summed over the pools) "
        "the planner runs: it removes the most expensive replicas first to stay within it "
        "(ScalingLimited), never below a pool's replicas.min.",
    )
    max_cost_per_hour: str | None = Field(
        default=None,
        pattern=DECIMAL,
        description="Most the fleet may cost per hour at the AcceleratorPools' costPerDeviceHour, "
        'a decimal string such as "120": the planner removes the most expensive replicas first to '
        "stay within it (ScalingLimited), never below a pool's replicas.min.",
    )


class Autoscaling(Model):
    mode: Literal["planner", "recommend", "external", "off"] = Field(
        default="off",
        description="planner: Tandem's planner sets each pool's replicas and the router's split "
        "threshold. recommend: the planner runs and reports what it would set "
        "(status.pools[].recommendedReplicas, status.lastDecision, Events) but changes nothing: "
        "replicas are left as in external, the router keeps routing.minPromptTokens. external: "
        "replicas are left to an HPA/KEDA (set to replicas.min at creation). off: every pool is "
        "pinned to replicas.min.",
    )
    interval_seconds: int = Field(
        default=30, ge=5, le=3600, description="Seconds between planner decisions (5-3600)."
    )
    prometheus_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="The Prometheus the planner queries; default: the operator's --prometheus-url.",
    )
    budget: Budget | None = Field(
        default=None, description="Caps on the whole fleet that the planner keeps to (planner mode)."
    )


class InferencePoolSettings(Model):
    """Gateway API Inference Extension interop: one InferencePool per role, so a GIE gateway (an
    llm-d router, for instance) can route to the pools instead of Tandem's router. The fields
    set the InferencePools' spec.endpointPickerRef (name, port.number, failureMode); Tandem does
    not deploy the Endpoint Picker itself."""

    mode: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: own one InferencePool per role while the cluster serves the "
        "inference.networking.k8s.io/v1 InferencePool API; off: none (and remove the ones Tandem made).",
    )
    endpoint_picker: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        max_length=63,
        description="Name of the Endpoint Picker's Service, in the service's namespace (default "
        "<service>-epp); a DNS label such as llm-d-epp.",
    )
    endpoint_picker_port: int = Field(
        default=9002,
        ge=1,
        le=65535,
        description="The Endpoint Picker Service's port (1-65535; the GIE default is 9002).",
    )
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose",
        description="What the gateway does when the Endpoint Picker does not answer: FailClose drops "
        "the request, FailOpen picks an endpoint itself.",
    )


class Routing(Model):
    disaggregation: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: split prompts of at least minPromptTokens (in planner mode, of the "
        "planner's threshold); always: split every request while a prefill and a decode replica "
        "run; never: serve each request whole on one replica.",
    )
    min_prompt_tokens: int = Field(
        default=512, ge=0, description="Prompts shorter than this go to a mixed replica when one exists."
    )
    inference_pool: InferencePoolSettings = Field(default_factory=InferencePoolSettings)


class KvTransfer(Model):
    connector: Literal["nixl", "mooncake", "lmcache"] = Field(
        default="nixl", description="The engines' KV connector (vLLM's NixlConnector by default)."
    )
    fabric: Literal["auto", "rdma", "tcp"] = Field(
        default="auto",
        description="auto: RDMA when both AcceleratorPools of a pair have it, else TCP; rdma: "
        "RDMA (KVTransferReady=False when a pair lacks it); tcp: TCP always.",
    )


class InferenceServiceSpec(Model):
    model: ModelSpec = Field(description="The model served: its name, weights and shape.")
    engine: Engine = Field(
        default="vllm",
        description="vllm, sglang, or sim (Tandem's simulated worker, for clusters without accelerators).",
    )
    pools: list[PoolSpec] = Field(
        min_length=1,
        max_length=MAX_POOLS,
        description="The worker pools, each of one role on one AcceleratorPool.",
    )
    slo: Slo = Field(default_factory=Slo, description="Latency targets the planner sizes the pools for.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling, description="Who sets the pools' replicas, and the planner's settings."
    )
    routing: Routing = Field(
        default_factory=Routing, description="How the router chooses between the split and mixed paths."
    )
    kv_transfer: KvTransfer = Field(
        default_factory=KvTransfer, description="How KV caches move from prefill to decode pools."
    )

    def pools_by_role(self, role: Role) -> list[PoolSpec]:
        return [p for p in self.pools if p.role == role]


KNOWN_PRESETS: tuple[str, ...] = tuple(sorted(MODEL_PRESETS))

MODEL_RULES = [
    rule(
        "!has(self.preset) || self.preset in " + str(list(KNOWN_PRESETS)),
        "model.preset must be one of " + ", ".join(KNOWN_PRESETS) + " (or give an architecture instead)",
    ),
    rule(
        "has(self.preset) != has(self.architecture)",
        "model needs exactly one of preset (a known architecture such as llama-3.1-8b) or architecture",
    ),
]
# the schema has no defaults inside the pools list (crdgen), so an omitted bound is the model's
_MIN, _MAX = Replicas.model_fields["min"].default, Replicas.model_fields["max"].default
REPLICAS_RULES = [
    rule(
        f"(has(self.min) ? self.min : {_MIN}) <= (has(self.max) ? self.max : {_MAX})",
        f"replicas.min must not exceed replicas.max (unset: min {_MIN}, max {_MAX})",
    )
]
MAX_UNAVAILABLE_RULES = [
    rule(
        f"type(self) == int ? self >= 1 : self.matches('^{PERCENT}$')",
        MAX_UNAVAILABLE_MESSAGE,
    )
]
TP_RULES = [
    rule(
        "self in [1, 2, 4, 8, 16, 32, 64]",
        "tensorParallelSize must be a power of two (1, 2, 4, 8, 16, 32 or 64)",
    )
]
SPEC_RULES = [
    rule(
        "self.pools.all(p, self.pools.exists_one(q, q.name == p.name))",
        "pool names must be unique",
    ),
    rule(
        "self.pools.exists(p, p.role == 'decode' || p.role == 'mixed')",
        "at least one pool must have role decode or mixed (something has to generate tokens)",
    ),
    rule(
        "!self.pools.exists(p, p.role == 'prefill') || self.pools.exists(p, p.role == 'decode')",
        "a prefill pool needs a decode pool to hand its KV caches to",
    ),
    rule(
        "self.routing.disaggregation != 'always' || self.pools.exists(p, p.role == 'prefill')",
        "routing.disaggregation 'always' needs a prefill pool",
    ),
]
ROOT_RULES = [
    rule(
        f"size(self.metadata.name) <= {MAX_SERVICE_NAME}",
        f"the InferenceService name must be at most {MAX_SERVICE_NAME} characters "
        "(it prefixes the pools' Deployment and Service names)",
    ),
]


class PoolStatus(StatusModel):
    name: str
    role: Role
    accelerator_pool: str
    vendor: str | None = None
    desired_replicas: int = 0
    ready_replicas: int = 0
    recommended_replicas: int | None = Field(
        default=None,
        description="autoscaling.mode recommend: the replicas the planner would set now; "
        "absent when it would leave the pool as it runs.",
    )


class Decision(StatusModel):
    time: str
    reason: str
    message: str = ""
    signals: dict[str, str] = Field(default_factory=dict)
    mode: str | None = Field(default=None, description="The autoscaling mode it was made in.")


class RoleSummary(StatusModel):
    """Ready/desired replicas per role, as text for `kubectl get`."""

    prefill: str = "0/0"
    decode: str = "0/0"
    mixed: str = "0/0"


class InferenceServiceStatus(StatusModel):
    observed_generation: int | None = None
    conditions: list[Condition] = conditions_field()
    pools: list[PoolStatus] = Field(
        default_factory=list, json_schema_extra={"x-kubernetes-list-type": "atomic"}
    )
    replicas: RoleSummary | None = None
    ratio: str | None = Field(default=None, description="Current prefill:decode replica ratio, e.g. 1:2.")
    target_ratio: str | None = None
    endpoint: str | None = None
    last_decision: Decision | None = None


class InferenceService(Model):
    api_version: Literal["inference.tandem.dev/v1alpha1"] = "inference.tandem.dev/v1alpha1"
    kind: Literal["InferenceService"] = "InferenceService"
    spec: InferenceServiceSpec
