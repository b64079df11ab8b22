"""The router's Prometheus metrics (served at ``/metrics`` on the router's port).

* ``tandem_router_requests_total`` (counter; ``path``, ``code``): requests answered, by the path that
  answered (``split`` or ``mixed``) and HTTP status (``499``: the client went away).
* ``tandem_router_decisions_total`` (counter; ``path``, ``reason``): `tandem.router.decide.Reason`.
* ``tandem_router_time_to_first_token_seconds`` (histogram; ``path``): streaming requests, to the
  first byte of the body, as the client sees it.
* ``tandem_router_e2e_request_latency_seconds`` (histogram; ``path``): arrival to last byte.
* ``tandem_router_upstream_errors_total`` (counter; ``role`` of the replica, ``kind``: ``connect``,
  ``timeout``, ``status`` (5xx) or ``stream`` (broke mid-stream)).
* ``tandem_router_retries_total`` (counter; ``step``): ``prefill`` (another prefill replica),
  ``decode`` (another decode replica), ``mixed`` (another replica for a whole request),
  ``fallback`` (a split request served whole by one replica).
* ``tandem_router_prompt_tokens`` (histogram; ``method``: ``tokenizer`` or ``bytes``, the estimate
  ``ceil(utf8 bytes / 4)``): every valid request as it arrives, before routing (refused ones
  too): the planner's demand.
* ``tandem_router_dispatched_total`` (counter; ``pool``, ``role``): requests sent to a replica of
  the pool, every attempt: the load each pool is offered (its engine counts a request only when
  it finishes). The label is the metric's own: scrape the router without a ``pool`` label.
* ``tandem_router_split_threshold_tokens`` (gauge): the threshold in force.
* ``tandem_router_replicas`` (gauge; ``pool``, ``role``): replicas known.
* ``tandem_router_config_reloads_total`` (counter; ``result``: ``ok`` or ``error``).

Every metric lives in the router's own registry, so several routers can share a process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Router-side latencies: from a few ms (a cached short request) to long generations, finer
# around common TTFT targets (the planner's error budget interpolates within a bucket).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 20.0, 40.0,
    80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
# Prompt tokens: vLLM's 1-2-5 series of request_prompt_tokens (the planner's
# tandem.planner.lengths.BUCKETS), so that the planner reads the router's arrivals at the
# resolution of the engines' histograms (power-of-two bounds cost it accuracy on long prompts).
TOKEN_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000,
)  # fmt: skip


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tandem_router_requests",
            "Requests answered, by path and HTTP status.",
            ["path", "code"],
            registry=r,
        )
        self.dispatched = Counter(
            "tandem_router_dispatched",
            "Requests sent to a replica, by its pool and role (every attempt): the load each pool "
            "is offered, which its engine counts only as the requests finish.",
            ["pool", "role"],
            registry=r,
        )
        self.decisions = Counter(
            "tandem_router_decisions", "Routing decisions by path and reason.", ["path", "reason"], registry=r
        )
        self.ttft = Histogram(
            "tandem_router_time_to_first_token_seconds",
            "Time to the first streamed byte, as the client sees it.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_router_e2e_request_latency_seconds",
            "Request latency as the client sees it.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "tandem_router_upstream_errors", "Failed upstream calls.", ["role", "kind"], registry=r
        )
        self.retries = Counter(
            "tandem_router_retries", "Upstream retries and fallbacks.", ["step"], registry=r
        )
        self.prompt_tokens = Histogram(
            "tandem_router_prompt_tokens",
            "Prompt tokens per request as the router counts them (method: tokenizer or bytes).",
            ["method"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.split_threshold = Gauge(
            "tandem_router_split_threshold_tokens", "The split threshold in force.", registry=r
        )
        self.replicas = Gauge(
            "tandem_router_replicas", "Replicas known, per pool.", ["pool", "role"], registry=r
        )
        self.config_reloads = Counter(
            "tandem_router_config_reloads", "Config reloads by result.", ["result"], registry=r
        )
        self._counters: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self._histograms: dict[tuple[int, tuple[str, ...]], Histogram] = {}

    # The hot path calls these per request: the labelled children are looked up once and cached.

    def inc(self, metric: Counter, *labels: str) -> None:
        key = (id(metric), labels)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metric.labels(*labels)
        child.inc()

    def observe(self, metric: Histogram, value: float, *labels: str) -> None:
        key = (id(metric), labels)
        child = self._histograms.get(key)
        if child is None:
            child = self._histograms[key] = metric.labels(*labels)
        child.observe(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
