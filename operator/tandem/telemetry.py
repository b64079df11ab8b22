"""The operator's own Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

KUBE_REQUESTS = Counter(
    "tandem_kube_requests_total", "Requests the operator made to the Kubernetes API.", ["verb", "kind"]
)
RECONCILES = Counter("tandem_reconciles_total", "InferenceService reconciles, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "tandem_reconcile_duration_seconds",
    "Time one InferenceService reconcile took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CHILD_WRITES = Counter(
    "tandem_child_writes_total", "Objects applied or pruned for InferenceServices.", ["action", "kind"]
)
