"""Prometheus adapter: named PromQL per engine, and one :class:`PoolObservation` per pool.

I/O lives here (the planner is pure). Queries use the Prometheus HTTP API through
prometheus-api-client, whose ``custom_query(..., timeout=)`` passes a client-side timeout
to ``requests``; every query also carries the server-side ``timeout`` parameter, so a
slow Prometheus stops evaluating and a hung one cannot block the caller longer than
``timeout_s``. The client is synchronous: call :func:`read_observation` from a thread
(``asyncio.to_thread``) in the operator.

**Target labels.** Scraped engine series must carry ``namespace``, ``service`` (the
InferenceService name), ``pool`` (the pool name) and ``role``; the fleet agent's
ServiceMonitor/PodMonitor relabelling attaches them from the worker pods' labels. One
query per signal covers every pool of a service (``... by (pool)``).

**No data is None, never 0.** A pool missing from a result, a NaN (a ratio over an
empty window: 0/0) and a failed query all give ``None``; a failed query also marks every
pool's observation ``complete=False`` so the planner holds.

Metric names: vLLM 0.33 ``vllm/v1/metrics/loggers.py`` and SGLang 0.5
``sglang/srt/observability/metrics_collector.py`` (/work/shared/notes/perf-anchors.md §8).
Renamed vLLM metrics are queried with ``or`` fallbacks: ``gpu_cache_usage_perc`` (removed
in favour of ``kv_cache_usage_perc``, vLLM PR #29330) and ``time_per_output_token_seconds``
(replaced by ``inter_token_latency_seconds``, #24110). Latency means use
``rate(_sum)/rate(_count)`` because vLLM's first ITL bucket is 10 ms (too coarse for
fast decode); p90s use ``histogram_quantile`` on the buckets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from tandem.planner.types import CLIENT, PoolObservation

log = logging.getLogger(__name__)

EngineName = Literal["vllm", "sglang", "sim"]
LABELS = ("namespace", "service", "pool", "role")


class PromClient(Protocol):
    """The part of ``prometheus_api_client.PrometheusConnect`` we use."""

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Names:
    """Metric names of one engine (first name preferred, the rest are fallbacks)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    prompt_tokens: tuple[str, ...]  # counters, without the _total suffix handled below
    generation_tokens: tuple[str, ...]
    requests: tuple[str, ...]
    ttft: tuple[str, ...]  # histograms (base names)
    itl: tuple[str, ...]
    prompt_len: tuple[str, ...]
    output_len: tuple[str, ...]


ENGINES: dict[str, Names] = {
    "vllm": Names(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        prompt_tokens=("vllm:prompt_tokens_total",),
        generation_tokens=("vllm:generation_tokens_total",),
        requests=("vllm:request_success_total",),
        ttft=("vllm:time_to_first_token_seconds",),
        itl=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        prompt_len=("vllm:request_prompt_tokens",),
        output_len=("vllm:request_generation_tokens",),
    ),
    "sglang": Names(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_usage=("sglang:token_usage",),
        prompt_tokens=("sglang:prompt_tokens_total",),
        generation_tokens=("sglang:generation_tokens_total",),
        requests=("sglang:num_requests_total",),
        ttft=("sglang:time_to_first_token_seconds",),
        itl=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        prompt_len=("sglang:prompt_tokens_histogram",),
        output_len=("sglang:generation_tokens_histogram",),
    ),
}
# Tandem's simulated worker (tandem.sim.worker) exports vLLM's names.
ENGINES["sim"] = ENGINES["vllm"]
# The router's histogram of first tokens as clients see them (tandem.router.metrics); its
# targets carry ``namespace`` and ``service`` like the engines', and no ``pool``.
ROUTER_TTFT = "tandem_router_time_to_first_token_seconds"
# The router's histogram of prompt tokens, observed as each request arrives (before routing):
# the demand without the engines' lag (they count a request when it finishes).
ROUTER_PROMPT = "tandem_router_prompt_tokens"
# The router's requests sent to each pool (its metric carries the ``pool`` label itself).
ROUTER_DISPATCHED = "tandem_router_dispatched_total"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def selector(namespace: str, service: str, pool: str | None = None) -> str:
    """``{namespace="..",service=".."[,pool=".."]}`` with values escaped."""
    parts = [f'namespace="{_quote(namespace)}"', f'service="{_quote(service)}"']
    if pool is not None:
        parts.append(f'pool="{_quote(pool)}"')
    return "{" + ",".join(parts) + "}"


def _either(exprs: Iterable[str]) -> str:
    """``a or b`` with each side parenthesised (PromQL ``or`` binds looser than ``/``)."""
    items = list(exprs)
    return items[0] if len(items) == 1 else " or ".join(f"({e})" for e in items)


def _duration(window_s: float) -> str:
    return f"{max(1, round(window_s))}s"


@dataclass(frozen=True)
class PromQL:
    """The named queries of one engine for one service, rendered per window."""

    engine: str
    sel: str
    window: str

    @property
    def names(self) -> Names:
        return ENGINES[self.engine]

    def _gauge(self, agg: str, names: tuple[str, ...]) -> str:
        return _either(f"{agg} by (pool) ({n}{self.sel})" for n in names)

    def _rate(self, names: tuple[str, ...]) -> str:
        return _either(f"sum by (pool) (rate({n}{self.sel}[{self.window}]))" for n in names)

    def _mean(self, names: tuple[str, ...]) -> str:
        return _either(
            f"sum by (pool) (rate({n}_sum{self.sel}[{self.window}]))"
            f" / sum by (pool) (rate({n}_count{self.sel}[{self.window}]))"
            for n in names
        )

    def _p90(self, names: tuple[str, ...]) -> str:
        return _either(
            f"histogram_quantile(0.9, sum by (pool, le) (rate({n}_bucket{self.sel}[{self.window}])))"
            for n in names
        )

    def queries(self) -> dict[str, str]:
        """PoolObservation field -> PromQL."""
        n = self.names
        return {
            "waiting": self._gauge("sum", n.waiting),
            "running": self._gauge("sum", n.running),
            "kv_usage": self._gauge("avg", n.kv_usage),
            "prompt_tokens_per_s": self._rate(n.prompt_tokens),
            "generation_tokens_per_s": self._rate(n.generation_tokens),
            "requests_per_s": self._rate(n.requests),
            "mean_ttft_s": self._mean(n.ttft),
            "mean_itl_s": self._mean(n.itl),
            "mean_prompt_tokens": self._mean(n.prompt_len),
            "mean_output_tokens": self._mean(n.output_len),
            "p90_ttft_s": self._p90(n.ttft),
            "p90_itl_s": self._p90(n.itl),
            "scrape_age_s": f"time() - max by (pool) (timestamp({n.running[0]}{self.sel}))",
            # the prompt-length histogram (requests/s per upper bound), for the split threshold
            "prompt_tokens_buckets": _either(
                f"sum by (pool, le) (rate({x}_bucket{self.sel}[{self.window}]))" for x in n.prompt_len
            ),
            # the TTFT histogram (first tokens/s per upper bound), for the SLO's error budget
            "ttft_buckets": _either(
                f"sum by (pool, le) (rate({x}_bucket{self.sel}[{self.window}]))" for x in n.ttft
            ),
            # what the router sent each pool (the per-replica load of the online correction)
            "routed_per_s": f"sum by (pool) (rate({ROUTER_DISPATCHED}{self.sel}[{self.window}]))",
            # the router's, every path, as clients see it (the error budget prefers it)
            "client_ttft_buckets": f"sum by (le) (rate({ROUTER_TTFT}_bucket{self.sel}[{self.window}]))",
            # the router's arrivals (the demand prefers them)
            "client_requests_per_s": f"sum(rate({ROUTER_PROMPT}_count{self.sel}[{self.window}]))",
            "client_mean_prompt_tokens": f"sum(rate({ROUTER_PROMPT}_sum{self.sel}[{self.window}]))"
            f" / sum(rate({ROUTER_PROMPT}_count{self.sel}[{self.window}]))",
            "client_prompt_tokens_buckets": (
                f"sum by (le) (rate({ROUTER_PROMPT}_bucket{self.sel}[{self.window}]))"
            ),
        }


def promql(engine: str, namespace: str, service: str, window_s: float) -> PromQL:
    if engine not in ENGINES:
        raise KeyError(f"unknown engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    return PromQL(engine, selector(namespace, service), _duration(window_s))


def parse_vector(result: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """Instant-vector result -> pool -> value (NaN and unparsable values become None)."""
    out: dict[str, float | None] = {}
    for sample in result:
        pool = sample.get("metric", {}).get("pool")
        value = sample.get("value")
        if pool is None or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        try:
            number = float(value[1])
        except (TypeError, ValueError):
            out[pool] = None
            continue
        out[pool] = number if math.isfinite(number) else None
    return out


def parse_buckets(result: Iterable[Mapping[str, Any]]) -> dict[str, tuple[tuple[float, float], ...] | None]:
    """``sum by (pool, le)`` of a histogram's bucket rates -> pool -> ((upper bound, rate), ...)
    sorted by bound (``+Inf`` last). A pool with a NaN or unparsable sample gets None; a pool
    whose rates are all zero (no requests in the window) too: no distribution to read."""
    per_pool: dict[str, list[tuple[float, float]] | None] = {}
    for sample in result:
        metric = sample.get("metric", {})
        pool, le, value = metric.get("pool"), metric.get("le"), sample.get("value")
        if pool is None or le is None or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        if pool in per_pool and per_pool[pool] is None:
            continue
        try:
            bound, rate = float(le), float(value[1])
        except (TypeError, ValueError):
            per_pool[pool] = None
            continue
        if math.isnan(bound) or not math.isfinite(rate) or rate < 0:
            per_pool[pool] = None
            continue
        per_pool.setdefault(pool, []).append((bound, rate))  # type: ignore[union-attr]
    return {
        pool: (tuple(sorted(b)) if b and any(r > 0 for _, r in b) else None) for pool, b in per_pool.items()
    }


def read_observation(
    client: PromClient,
    namespace: str,
    service: str,
    pools: Iterable[str],
    window_s: float,
    timeout_s: float = 5.0,
    engine: str = "vllm",
) -> dict[str, PoolObservation]:
    """One observation per pool over the last ``window_s`` seconds, and under ``CLIENT`` the
    router's reading when it is scraped: its TTFT histogram (``ttft_buckets``, once it
    served) and its arrivals (``requests_per_s``, ``mean_prompt_tokens``,
    ``prompt_tokens_buckets``, once a request came).

    Every query carries a ``timeout_s`` client and server timeout. A failed query leaves
    its field ``None`` and marks every observation incomplete; it never raises. Once one
    query could not reach the server (refused, timed out), the rest are not sent: the
    reading is incomplete anyway, and a dozen queries each waiting out a timeout against a
    server that is gone would hold the caller for minutes.
    """
    names = list(pools)
    values: dict[str, dict[str, float | None]] = {p: {} for p in names}
    buckets: dict[str, dict[str, tuple[tuple[float, float], ...] | None]] = {}
    router: dict[str, float | None] = {}
    complete = True
    unreachable = False
    for field_name, query in promql(engine, namespace, service, window_s).queries().items():
        if not complete and unreachable:
            break
        try:
            # Prometheus durations take no fractions ("2.5s" is a 400): milliseconds
            result = client.custom_query(
                query, params={"timeout": f"{max(1, round(timeout_s * 1000))}ms"}, timeout=timeout_s
            )
        except Exception as err:
            log.warning("Prometheus query %s for %s/%s failed: %s", field_name, namespace, service, err)
            complete = False
            unreachable = _is_unreachable(err)
            continue
        if field_name.startswith("client_"):  # the router's: no pool label, keyed CLIENT
            rows = [
                {**row, "metric": {**row.get("metric", {}), "pool": CLIENT}}
                for row in (result if isinstance(result, list) else [])
            ]
            if field_name.endswith("_buckets"):
                buckets[field_name] = parse_buckets(rows)
            else:
                router[field_name.removeprefix("client_")] = parse_vector(rows).get(CLIENT)
            continue
        if field_name in ("prompt_tokens_buckets", "ttft_buckets"):
            buckets[field_name] = parse_buckets(result if isinstance(result, list) else [])
            continue
        parsed = parse_vector(result if isinstance(result, list) else [])
        for pool in names:
            values[pool][field_name] = parsed.get(pool)
    out: dict[str, PoolObservation] = {}
    for pool in names:
        v = values[pool]
        out[pool] = PoolObservation(
            waiting=v.get("waiting"),
            running=v.get("running"),
            kv_usage=v.get("kv_usage"),
            prompt_tokens_per_s=v.get("prompt_tokens_per_s"),
            generation_tokens_per_s=v.get("generation_tokens_per_s"),
            requests_per_s=v.get("requests_per_s"),
            mean_ttft_s=v.get("mean_ttft_s"),
            mean_itl_s=v.get("mean_itl_s"),
            mean_prompt_tokens=v.get("mean_prompt_tokens"),
            mean_output_tokens=v.get("mean_output_tokens"),
            p90_ttft_s=v.get("p90_ttft_s"),
            p90_itl_s=v.get("p90_itl_s"),
            scrape_age_s=v.get("scrape_age_s"),
            prompt_tokens_buckets=buckets.get("prompt_tokens_buckets", {}).get(pool),
            ttft_buckets=buckets.get("ttft_buckets", {}).get(pool),
            routed_per_s=v.get("routed_per_s"),
            complete=complete,
        )
    seen = buckets.get("client_ttft_buckets", {}).get(CLIENT)
    lengths = buckets.get("client_prompt_tokens_buckets", {}).get(CLIENT)
    if seen is not None or router.get("requests_per_s") is not None:
        out[CLIENT] = replace(
            PoolObservation.empty(complete=complete),
            ttft_buckets=seen,
            requests_per_s=router.get("requests_per_s"),
            mean_prompt_tokens=router.get("mean_prompt_tokens"),
            prompt_tokens_buckets=lengths,
        )
    return out


def _is_unreachable(err: Exception) -> bool:
    """The server could not be reached or did not answer in time (not: it answered an error)."""
    import requests

    return isinstance(err, requests.ConnectionError | requests.Timeout)


def connect(url: str, timeout_s: float = 5.0) -> PromClient:
    """A PrometheusConnect with a default request timeout (TLS verification off, as the
    in-cluster Prometheus commonly uses a self-signed certificate) and no retries.

    prometheus-api-client retries by default with exponential back-off (measured here: about
    6 s per query against a stopped server, a minute per reading); the planner's next
    interval is the retry, so a failed query should fail at once.
    """
    from prometheus_api_client import PrometheusConnect
    from urllib3.util.retry import Retry

    client: PromClient = PrometheusConnect(
        url=url, disable_ssl=True, timeout=timeout_s, retry=Retry(total=0, raise_on_status=False)
    )
    return client
