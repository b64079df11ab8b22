"""Base types shared by the CRD models.

Every model is a frozen pydantic model whose Python attributes are snake_case and whose wire
names (the CRD fields) are camelCase. Unknown fields are rejected (``extra="forbid"``), mirroring
the structural schema the apiserver enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
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


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class KeyRef(Model):
    """A key of a ConfigMap or Secret in the pod's own namespace."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)
    optional: bool | None = None


class FieldRef(Model):
    field_path: str = Field(min_length=1)
    api_version: str | None = None


class ResourceFieldRef(Model):
    resource: str = Field(min_length=1)
    container_name: str | None = None
    divisor: IntOrString | None = None


class EnvVarSource(Model):
    """Kubernetes' EnvVarSource, typed so a mistake is refused at admission, not at rollout."""

    config_map_key_ref: KeyRef | None = None
    secret_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None
    resource_field_ref: ResourceFieldRef | None = None


class EnvVar(Model):
    name: str = Field(min_length=1, max_length=253)
    value: str | None = None
    value_from: EnvVarSource | None = None


class ResourceRequirements(Model):
    requests: dict[str, IntOrString] | None = None
    limits: dict[str, IntOrString] | None = None
