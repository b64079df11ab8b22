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

# Any JSON object kept as written (e.g. an env var's valueFrom).
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
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


class EnvVar(Model):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: FreeForm | None = None


class ResourceRequirements(Model):
    requests: dict[str, IntOrString] | None = None
    limits: dict[str, IntOrString] | None = None
