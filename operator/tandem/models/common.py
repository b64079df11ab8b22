"""Base types shared by the CRD models.

Every model is a frozen pydantic model whose Python attributes are snake_case and whose wire
names (the CRD fields) are camelCase. Unknown fields are rejected (``extra="forbid"``), mirroring
the structural schema the apiserver enforces.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

# A Kubernetes quantity or port: the user may write 4 or "4" or "500m".
IntOrString = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DECIMAL = r"^[0-9]+(\.[0-9]+)?$"


def rule(expr: str, message: str, **extra: str) -> dict[str, str]:
    """A CEL validation rule with the sentence a person sees when it fails."""
    return {"rule": expr, "message": message, **extra}


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the apiserver stores it: camelCase, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(Model):
    # Status is written by the operator; accept fields from newer operator versions.
    model_config = ConfigDict(extra="ignore")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A condition by the Kubernetes API conventions (metav1.Condition)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


CONDITIONS_LIST_SCHEMA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def conditions_field() -> Any:
    return Field(default_factory=list, json_schema_extra=CONDITIONS_LIST_SCHEMA)


# A label key (Kubernetes "qualified name"): an optional DNS-subdomain prefix and '/', then a
# name of at most 63 characters (k8s.io/apimachinery/pkg/util/validation IsQualifiedName).
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"


class Toleration(Model):
    """A pod toleration, validated as the apiserver validates a Pod's (so a pool that passes
    admission never yields Deployments the apiserver rejects). ``operator`` defaults to Equal."""

    key: str | None = Field(
        default=None,
        max_length=317,
        description="The taint key it tolerates; empty with Exists: every taint.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Equal (default): the taint's value must match; Exists: any value."
    )
    value: str | None = Field(default=None, max_length=63, description="The taint value, with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="The taint effect it tolerates; empty: every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="With NoExecute: how long the pod stays after the taint appears."
    )

    @model_validator(mode="after")
    def _like_a_pod(self) -> Toleration:
        for problem in toleration_problems(
            self.key, self.operator, self.value, self.effect, self.toleration_seconds
        ):
            raise ValueError(problem)
        return self


def toleration_problems(
    key: str | None, operator: str | None, value: str | None, effect: str | None, seconds: int | None
) -> list[str]:
    """The sentences of TOLERATION_RULES, checked in Python (the operator's own parse)."""
    out = []
    if key and re.match(QUALIFIED_NAME, key) is None:
        out.append(TOLERATION_MESSAGES["key"])
    if not key and operator != "Exists":
        out.append(TOLERATION_MESSAGES["keyless"])
    if operator == "Exists" and value:
        out.append(TOLERATION_MESSAGES["exists"])
    if value and re.match(LABEL_VALUE, value) is None:
        out.append(TOLERATION_MESSAGES["value"])
    if seconds is not None and effect != "NoExecute":
        out.append(TOLERATION_MESSAGES["seconds"])
    return out


TOLERATION_MESSAGES = {
    "key": "a toleration key must be a label key such as nvidia.com/gpu (an optional DNS prefix and '/', "
    "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
    "keyless": "a toleration without a key must use operator Exists (it then tolerates every taint)",
    "exists": "a toleration with operator Exists must not have a value",
    "value": "a toleration value must be a label value (at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit)",
    "seconds": "tolerationSeconds is only allowed with effect NoExecute",
}
TOLERATION_RULES = [
    rule(
        f"!has(self.key) || size(self.key) == 0 || self.key.matches(r'{QUALIFIED_NAME}')",
        TOLERATION_MESSAGES["key"],
    ),
    rule(
        "(has(self.key) && size(self.key) > 0) || (has(self.operator) && self.operator == 'Exists')",
        TOLERATION_MESSAGES["keyless"],
    ),
    rule(
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || size(self.value) == 0",
        TOLERATION_MESSAGES["exists"],
    ),
    rule(f"!has(self.value) || self.value.matches(r'{LABEL_VALUE}')", TOLERATION_MESSAGES["value"]),
    rule(
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        TOLERATION_MESSAGES["seconds"],
    ),
]


class KeyRef(Model):
    """A key of a ConfigMap or Secret in the pod's own namespace."""

    name: str = Field(min_length=1, max_length=253, description="The ConfigMap's or Secret's name.")
    key: str = Field(min_length=1, max_length=253, description="The key whose value is used.")
    optional: bool | None = Field(default=None, description="Start the pod even if it is missing.")


class FieldRef(Model):
    """A field of the pod, e.g. status.podIP."""

    field_path: str = Field(min_length=1, description="The field's path, e.g. metadata.name.")
    api_version: str | None = Field(default=None, description="Schema version of the path (default v1).")


class ResourceFieldRef(Model):
    """A resource request or limit of a container, e.g. limits.memory."""

    resource: str = Field(min_length=1, description="The resource, e.g. limits.memory.")
    container_name: str | None = Field(default=None, description="The container (default: this one).")
    divisor: IntOrString | None = Field(default=None, description="Unit of the value (default 1).")


class EnvVarSource(Model):
    """Kubernetes' EnvVarSource, typed so a mistake is refused at admission, not at rollout."""

    config_map_key_ref: KeyRef | None = None
    secret_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None
    resource_field_ref: ResourceFieldRef | None = None


class EnvVar(Model):
    name: str = Field(min_length=1, max_length=253, description="The variable's name.")
    value: str | None = Field(default=None, description="Its value (or valueFrom).")
    value_from: EnvVarSource | None = Field(default=None, description="Where its value comes from.")


class ResourceRequirements(Model):
    requests: dict[str, IntOrString] | None = Field(
        default=None, description="Resource requests, e.g. {cpu: 8, memory: 64Gi}."
    )
    limits: dict[str, IntOrString] | None = Field(default=None, description="Resource limits.")
