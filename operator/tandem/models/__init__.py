"""The CRD types (pydantic): the single source of truth for the API and its schema."""

from tandem.models.accelerator_pool import AcceleratorPool, AcceleratorPoolSpec, AcceleratorPoolStatus
from tandem.models.common import Condition
from tandem.models.inference_service import (
    InferenceService,
    InferenceServiceSpec,
    InferenceServiceStatus,
    PoolSpec,
    PoolStatus,
)

__all__ = [
    "AcceleratorPool",
    "AcceleratorPoolSpec",
    "AcceleratorPoolStatus",
    "Condition",
    "InferenceService",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "PoolSpec",
    "PoolStatus",
]
