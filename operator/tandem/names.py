"""Names shared by every layer: API group, labels, annotations, ports, env names.

One place for every string another object or another program relies on, so a typo cannot make
the operator lose track of what it owns.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "inference.tandem.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

KIND_SERVICE: Final = "InferenceService"
PLURAL_SERVICE: Final = "inferenceservices"
KIND_POOL: Final = "AcceleratorPool"
PLURAL_POOL: Final = "acceleratorpools"

FIELD_MANAGER: Final = "tandem-operator"
# Co-owns a Deployment's spec.replicas for the moment Tandem stops setting it (autoscaling.mode
# external or recommend): server-side apply resets a field its only manager drops, to 1 for replicas.
REPLICAS_HANDOVER_MANAGER: Final = "tandem-replicas-handover"

# Labels on everything the operator creates.
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "tandem"
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_SERVICE: Final = f"{GROUP}/service"
LABEL_POOL: Final = f"{GROUP}/pool"
LABEL_ROLE: Final = f"{GROUP}/role"
LABEL_VENDOR: Final = f"{GROUP}/vendor"
LABEL_ACCELERATOR_POOL: Final = f"{GROUP}/accelerator-pool"
# llm-d's role label, so llm-d's inference scheduler can route to Tandem's workers.
# llm-d calls a co-located worker "prefill-decode".
LABEL_LLMD_ROLE: Final = "llm-d.ai/role"
LLMD_ROLE_BY_ROLE: Final = {"prefill": "prefill", "decode": "decode", "mixed": "prefill-decode"}

# Labels the fake (and recommended real) fleets carry on nodes.
NODE_LABEL_VENDOR: Final = f"{GROUP}/accelerator-vendor"
NODE_LABEL_MODEL: Final = f"{GROUP}/accelerator-model"

# Annotations.
ANNOTATION_SPEC_HASH: Final = f"{GROUP}/spec-hash"
# Planner tuning per InferenceService (seconds; no CRD field yet: see tandem.scaling.tuning_from).
ANNOTATION_PLANNER_DOWN_WINDOW: Final = f"{GROUP}/planner-scale-down-window-seconds"
ANNOTATION_PLANNER_LEAD_TIME: Final = f"{GROUP}/planner-lead-time-seconds"

# Ports (container side).
PORT_HTTP: Final = 8000
PORT_NAME_HTTP: Final = "http"

# Default resource names per vendor (device plugins' extended resources).
RESOURCE_BY_VENDOR: Final = {
    "nvidia": "nvidia.com/gpu",
    "amd": "amd.com/gpu",
    "intel": "habana.ai/gaudi",
}

# Default images. The tag follows the operator's version; folders under worker-images/.
IMAGE_REGISTRY: Final = "ghcr.io/tandem-dev"
