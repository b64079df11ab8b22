"""The operator's own Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

KUBE_REQUESTS = Counter(
    "tandem_kube_requests_total", "Requests the operator made to the Kubernetes API.", ["verb", "kind"]
)
RECONCILES = Counter("tandem_reconciles_total", "InferenceService reconciles, by result.", ["result"])
for _result in ("ok", "problem", "error"):  # from 0, so that the first error counts in increase()
    RECONCILES.labels(_result)
# Per service, for the TandemReconcileErrors alert: a gauge, so the alert clears with the first
# reconcile that succeeds and, the series removed with the service, once it is deleted (a
# per-service counter's increase() would keep firing for a whole window after either).
RECONCILE_ERRORS_IN_A_ROW = Gauge(
    "tandem_reconcile_consecutive_errors",
    "Reconciles of an InferenceService that ended in an error in a row: 0 since the last one that "
    "did not, absent for a deleted service.",
    ["namespace", "service"],
)
RECONCILE_SECONDS = Histogram(
    "tandem_reconcile_duration_seconds",
    "Time one InferenceService reconcile took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CRD_MISSING_FIELDS = Gauge(
    "tandem_crd_missing_fields",
    "Fields of this operator's CRD that the cluster's lacks (the apiserver drops them from every "
    "object it stores): 0 when the installed CRD is current; absent when it could not be read.",
    ["crd"],
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
PLANNER_HOLDING = Gauge(
    "tandem_planner_holding",
    "1 while the planner's last step decided nothing from metrics (Prometheus unreachable or not "
    "configured, metrics missing, implausible or stale): it changes no replicas meanwhile.",
    ["namespace", "service"],
)
PLANNER_LIMITED = Gauge(
    "tandem_planner_limited",
    "1 while the planner's last decision was held back: by=budget (spec.autoscaling.budget), "
    "by=max (a pool's replicas.max), by=infeasible (no pool of a role meets the SLO).",
    ["namespace", "service", "by"],
)
LIMITS = ("budget", "max", "infeasible")
PLANNER_TTFT_WITHIN_TARGET = Gauge(
    "tandem_planner_ttft_within_target_ratio",
    "Share of first tokens within the TTFT target over about 30 minutes, as the planner reads it "
    "(its error budget; absent until enough requests were seen).",
    ["namespace", "service"],
)
PLANNER_ATTAINMENT_TARGET = Gauge(
    "tandem_planner_attainment_target_ratio",
    "The share of requests that must meet the SLO (spec.slo.attainment).",
    ["namespace", "service"],
)
PLANNER_READ_SECONDS = Histogram(
    "tandem_planner_observation_seconds",
    "Time one Prometheus read of a service's pools took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
