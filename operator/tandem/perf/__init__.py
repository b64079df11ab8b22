"""Pure performance model: accelerator catalog, model presets and roofline iteration times.

No I/O and no Kubernetes imports (an import-linter contract enforces it).
"""

from tandem.perf.catalog import ACCELERATORS, Accelerator, custom_accelerator, get_accelerator
from tandem.perf.model import (
    PerfProfile,
    build_profile,
    decode_step_seconds,
    kv_bytes_per_token,
    kv_capacity_tokens,
    kv_transfer_seconds,
    prefill_seconds,
)
from tandem.perf.models import MODEL_PRESETS, ModelArch, get_model

__all__ = [
    "ACCELERATORS",
    "MODEL_PRESETS",
    "Accelerator",
    "ModelArch",
    "PerfProfile",
    "build_profile",
    "custom_accelerator",
    "decode_step_seconds",
    "get_accelerator",
    "get_model",
    "kv_bytes_per_token",
    "kv_capacity_tokens",
    "kv_transfer_seconds",
    "prefill_seconds",
]
