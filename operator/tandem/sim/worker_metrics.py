"""vLLM's Prometheus metrics for the simulated worker.

Names, types, help strings, labels and histogram buckets follow vLLM's V1 ``PrometheusStatLogger``
(``vllm/v1/metrics/loggers.py``): every series carries ``model_name`` (the served model name) and
``engine`` (the engine index, ``"0"`` for a single engine); counters are declared without the ``_total``
suffix and exposed with it by prometheus-client, as vLLM does. ``vllm:cache_config_info`` is vLLM's
info-style gauge (value 1) whose labels are the cache config plus ``engine``.

Latencies are the engine's model seconds (see `tandem.sim.worker_engine.ModelClock`), so a worker running
at ``time_scale=0.01`` still reports realistic TTFT and ITL.

Each worker owns a `CollectorRegistry`, so several workers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tandem.sim.worker_engine import FINISH_REASONS, SimRequest

__all__ = ["CONTENT_TYPE_LATEST", "WorkerMetrics", "build_1_2_5_buckets"]

LABELS = ("model_name", "engine")

# vllm/v1/metrics/loggers.py
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's buckets for token-count histograms)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


class WorkerMetrics:
    """An `EngineObserver` that records vLLM's metrics into its own registry."""

    def __init__(
        self,
        *,
        model_name: str,
        engine: str = "0",
        max_model_len: int,
        cache_config: Mapping[str, str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        values = (model_name, engine)
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=reg).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=reg, buckets=buckets).labels(*values)

        token_buckets = build_1_2_5_buckets(max_model_len)
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=reg,
        )
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.request_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        # Not a vLLM metric: a pull that failed makes the decode worker recompute the prompt itself,
        # which is silent in vLLM's own metrics (the request still succeeds, only slower).
        kv_fetches = Counter(
            "tandem_sim_kv_fetches",
            "KV pulls from a prefill worker, by outcome (failed: the prompt was recomputed locally).",
            (*LABELS, "outcome"),
            registry=reg,
        )
        self.kv_fetches = {ok: kv_fetches.labels(*values, "ok" if ok else "failed") for ok in (True, False)}
        info = {**cache_config, "engine": engine}
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(info),
            registry=reg,
        ).labels(**info).set(1)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    # EngineObserver

    def on_scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def on_iteration(self, num_tokens: int, num_preemptions: int) -> None:
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)
        if num_preemptions:
            self.preemptions.inc(num_preemptions)

    def on_first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(prompt_tokens)

    def on_tokens(self, num_generated: int, inter_token_latencies: Sequence[float]) -> None:
        self.generation_tokens.inc(num_generated)
        for latency in inter_token_latencies:
            self.itl.observe(latency)

    def on_kv_fetch(self, ok: bool) -> None:
        self.kv_fetches[ok].inc()

    def on_finished(self, request: SimRequest) -> None:
        if request.finished_at is None or request.finish_reason is None:
            return
        self.success[request.finish_reason].inc()
        self.e2e.observe(request.finished_at - request.arrival)
        scheduled = request.scheduled_at if request.scheduled_at is not None else request.arrival
        first = request.first_token_at if request.first_token_at is not None else request.finished_at
        self.queue_time.observe(scheduled - request.arrival)
        self.inference_time.observe(request.finished_at - scheduled)
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(request.finished_at - first)
        if request.num_generated > 1:
            self.tpot.observe((request.finished_at - first) / (request.num_generated - 1))
        self.request_prompt_tokens.observe(request.prompt_tokens)
        self.request_generation_tokens.observe(request.num_generated)
        self.request_max_tokens.observe(request.max_tokens)
