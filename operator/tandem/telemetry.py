"""The operator's own Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

# The autoscaling loop (tandem.autoscaler).
PLANNER_DECISIONS = Counter(
    "tandem_planner_decisions_total",
    "Planner decisions (and holds before the planner ran), per service, by reason.",
    ["namespace", "service", "reason"],
)
PLANNER_DESIRED_REPLICAS = Gauge(
    "tandem_planner_desired_replicas",
    "Replicas the planner wants per pool.",
    ["namespace", "service", "pool"],
)
PLANNER_SPLIT_THRESHOLD = Gauge(
    "tandem_planner_split_threshold_tokens",
    "Prompt length (tokens) at which the router splits prefill from decode, as the planner set it.",
    ["namespace", "service"],
)
PLANNER_READ_SECONDS = Histogram(
    "tandem_planner_observation_seconds",
    "Time one Prometheus read of a service's pools took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
