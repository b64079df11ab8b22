"""PromQL rendering and parsing (tandem.metrics) against recorded Prometheus API responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.metrics import parse_vector, promql, read_observation, selector
from tandem.planner.types import CLIENT

FIXTURES = Path(__file__).parent / "fixtures" / "prometheus"


def result(name: str) -> list[dict[str, Any]]:
    body = json.loads((FIXTURES / name).read_text())
    assert body["status"] == "success"
    return list(body["data"]["result"])


def test_selector_escapes_label_values() -> None:
    assert selector("team-a", "llama") == '{namespace="team-a",service="llama"}'
    assert selector("a", 'b"c', "p") == '{namespace="a",service="b\\"c",pool="p"}'


def test_vllm_queries_render_with_fallbacks_and_windows() -> None:
    q = promql("vllm", "team-a", "llama", 60).queries()
    sel = '{namespace="team-a",service="llama"}'
    assert q["waiting"] == f"sum by (pool) (vllm:num_requests_waiting{sel})"
    assert q["kv_usage"] == (
        f"(avg by (pool) (vllm:kv_cache_usage_perc{sel})) or (avg by (pool) (vllm:gpu_cache_usage_perc{sel}))"
    )
    assert q["prompt_tokens_per_s"] == f"sum by (pool) (rate(vllm:prompt_tokens_total{sel}[60s]))"
    assert q["mean_ttft_s"] == (
        f"sum by (pool) (rate(vllm:time_to_first_token_seconds_sum{sel}[60s]))"
        f" / sum by (pool) (rate(vllm:time_to_first_token_seconds_count{sel}[60s]))"
    )
    assert "vllm:time_per_output_token_seconds_sum" in q["mean_itl_s"]  # renamed metric fallback
    assert q["p90_ttft_s"].startswith(
        "histogram_quantile(0.9, sum by (pool, le) (rate(vllm:time_to_first_token_seconds_bucket"
    )
    assert set(q) == {
        "waiting", "running", "kv_usage", "prompt_tokens_per_s", "generation_tokens_per_s", "requests_per_s",
        "mean_ttft_s", "mean_itl_s", "mean_prompt_tokens", "mean_output_tokens", "p90_ttft_s", "p90_itl_s",
        "scrape_age_s", "prompt_tokens_buckets", "ttft_buckets", "client_ttft_buckets",
        "client_requests_per_s", "client_mean_prompt_tokens", "client_prompt_tokens_buckets", "routed_per_s",
    }  # fmt: skip
    # what the router sent each pool: its own metric carries the pool label
    assert q["routed_per_s"] == f"sum by (pool) (rate(tandem_router_dispatched_total{sel}[60s]))"
    # the router's arrivals: every request it counted the prompt of, before routing
    assert q["client_requests_per_s"] == f"sum(rate(tandem_router_prompt_tokens_count{sel}[60s]))"
    assert q["client_mean_prompt_tokens"] == (
        f"sum(rate(tandem_router_prompt_tokens_sum{sel}[60s]))"
        f" / sum(rate(tandem_router_prompt_tokens_count{sel}[60s]))"
    )
    assert q["client_prompt_tokens_buckets"] == (
        f"sum by (le) (rate(tandem_router_prompt_tokens_bucket{sel}[60s]))"
    )
    assert q["client_ttft_buckets"] == (
        f"sum by (le) (rate(tandem_router_time_to_first_token_seconds_bucket{sel}[60s]))"
    )
    assert (
        q["prompt_tokens_buckets"] == f"sum by (pool, le) (rate(vllm:request_prompt_tokens_bucket{sel}[60s]))"
    )
    assert q["ttft_buckets"] == f"sum by (pool, le) (rate(vllm:time_to_first_token_seconds_bucket{sel}[60s]))"


def test_sglang_uses_its_own_names() -> None:
    q = promql("sglang", "ns", "svc", 30).queries()
    assert "sglang:num_queue_reqs" in q["waiting"]
    assert "sglang:token_usage" in q["kv_usage"]
    assert "sglang:prompt_tokens_histogram_sum" in q["mean_prompt_tokens"]
    with pytest.raises(KeyError):
        promql("tgi", "ns", "svc", 30)


def test_parse_vector_maps_pools_and_nan_to_none() -> None:
    assert parse_vector(result("vllm_waiting.json")) == {"prefill": 3.0, "decode": 0.0}
    assert parse_vector(result("vllm_mean_ttft.json")) == {"prefill": 0.8125, "decode": None}
    assert parse_vector(result("empty.json")) == {}


class FakeProm:
    """Answers from fixtures by query field; records the timeouts it was given."""

    def __init__(self, answers: dict[str, str | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any] | None, float | None]] = []

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        self.calls.append((query, params, timeout))
        for key, answer in self.answers.items():
            if key in query:
                if isinstance(answer, Exception):
                    raise answer
                return result(answer)
        return result("empty.json")


def test_read_observation_fills_fields_and_leaves_no_data_as_none() -> None:
    prom = FakeProm(
        {
            "num_requests_waiting": "vllm_waiting.json",
            "time_to_first_token_seconds_sum": "vllm_mean_ttft.json",
        }
    )
    obs = read_observation(prom, "team-a", "llama", ["prefill", "decode", "mixed"], 60, timeout_s=2.5)
    assert obs["prefill"].waiting == 3.0 and obs["prefill"].mean_ttft_s == 0.8125
    assert obs["decode"].waiting == 0.0 and obs["decode"].mean_ttft_s is None
    assert obs["mixed"].waiting is None  # absent from the result: no data, not 0
    assert obs["prefill"].running is None
    assert all(o.complete for o in obs.values())
    assert prom.calls and all(t == 2.5 and p == {"timeout": "2500ms"} for _, p, t in prom.calls)


def test_a_failed_query_marks_every_pool_incomplete() -> None:
    prom = FakeProm({"num_requests_waiting": TimeoutError("read timed out")})
    obs = read_observation(prom, "ns", "svc", ["prefill"], 30)
    assert obs["prefill"].waiting is None
    assert obs["prefill"].complete is False


def test_an_unreachable_server_stops_the_reading_after_one_query() -> None:
    import requests

    prom = FakeProm({"num_requests_waiting": requests.ConnectionError("connection refused")})
    obs = read_observation(prom, "ns", "svc", ["prefill", "decode"], 30)
    assert all(not o.complete for o in obs.values())
    # the waiting query is the first one sent; nothing after it
    assert len(prom.calls) == 1 and "num_requests_waiting" in prom.calls[0][0]


def test_an_error_answer_does_not_stop_the_other_queries() -> None:
    prom = FakeProm({"num_requests_waiting": ValueError("HTTP 400: bad query")})
    obs = read_observation(prom, "ns", "svc", ["prefill"], 30)
    assert obs["prefill"].complete is False
    assert len(prom.calls) > 1


def test_the_client_sends_each_query_once_to_a_server_that_drops_connections() -> None:
    """prometheus-api-client retries five times with back-off by default; ours must not."""
    import socket
    import threading

    from tandem.metrics import connect

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = 0
    stop = threading.Event()

    def serve() -> None:
        nonlocal accepted
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.close()  # no answer: the client sees the connection dropped

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = connect(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=2.0)
        obs = read_observation(client, "ns", "svc", ["prefill"], 30, timeout_s=2.0)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert obs["prefill"].complete is False
    assert accepted == 1


def test_prompt_length_buckets_parse_per_pool_sorted_by_bound() -> None:
    from tandem.metrics import parse_buckets

    def sample(pool: str, le: str, value: str) -> dict[str, Any]:
        return {"metric": {"pool": pool, "le": le}, "value": [1.0, value]}

    parsed = parse_buckets(
        [
            sample("prefill", "+Inf", "2.0"),
            sample("prefill", "1024", "0.5"),
            sample("prefill", "4096", "1.5"),
            sample("decode", "1024", "0"),  # no requests in the window: no distribution
            sample("decode", "+Inf", "0"),
            sample("mixed", "1024", "NaN"),
            sample("mixed", "+Inf", "1"),
        ]
    )
    assert parsed == {
        "prefill": ((1024.0, 0.5), (4096.0, 1.5), (float("inf"), 2.0)),
        "decode": None,
        "mixed": None,
    }


def test_read_observation_carries_the_prompt_length_and_ttft_histograms() -> None:
    class Buckets(FakeProm):
        def custom_query(
            self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
        ) -> list[dict[str, Any]]:
            if "request_prompt_tokens_bucket" in query:
                return [
                    {"metric": {"pool": "p", "le": "512"}, "value": [1.0, "1"]},
                    {"metric": {"pool": "p", "le": "+Inf"}, "value": [1.0, "3"]},
                ]
            if "tandem_router_time_to_first_token_seconds_bucket" in query:  # no pool label
                return [
                    {"metric": {"le": "2.5"}, "value": [1.0, "5"]},
                    {"metric": {"le": "+Inf"}, "value": [1.0, "6"]},
                ]
            if "time_to_first_token_seconds_bucket" in query:
                return [
                    {"metric": {"pool": "q", "le": "1"}, "value": [1.0, "2"]},
                    {"metric": {"pool": "q", "le": "+Inf"}, "value": [1.0, "4"]},
                ]
            return super().custom_query(query, params, timeout)

    obs = read_observation(Buckets({}), "ns", "svc", ["p", "q"], 30)
    assert obs["p"].prompt_tokens_buckets == ((512.0, 1.0), (float("inf"), 3.0))
    assert obs["q"].prompt_tokens_buckets is None and obs["p"].complete
    assert obs["q"].ttft_buckets == ((1.0, 2.0), (float("inf"), 4.0)) and obs["p"].ttft_buckets is None
    # the router's histogram, as clients see it, under its own key
    assert obs[CLIENT].ttft_buckets == ((2.5, 5.0), (float("inf"), 6.0)) and obs[CLIENT].complete
    assert CLIENT not in read_observation(FakeProm({}), "ns", "svc", ["p"], 30)  # no router: no entry


def test_read_observation_carries_the_routers_arrivals() -> None:
    """The router observes each prompt before routing it: its counts are the arrivals, which
    the engines (counting finished requests) trail."""

    class Router(FakeProm):
        def __init__(self, rate: str) -> None:
            super().__init__({})
            self.rate = rate

        def custom_query(
            self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
        ) -> list[dict[str, Any]]:
            if "tandem_router_prompt_tokens_bucket" in query:  # no pool label
                return [
                    {"metric": {"le": "1024"}, "value": [1.0, "0" if self.rate == "0" else "2"]},
                    {"metric": {"le": "+Inf"}, "value": [1.0, self.rate]},
                ]
            if "tandem_router_prompt_tokens_sum" in query:  # the mean: sum / count
                return [{"metric": {}, "value": [1.0, "NaN" if self.rate == "0" else "1500"]}]
            if "tandem_router_prompt_tokens_count" in query:
                return [{"metric": {}, "value": [1.0, self.rate]}]
            if "tandem_router_dispatched_total" in query:  # the pool label is the metric's own
                return [{"metric": {"pool": "p"}, "value": [1.0, self.rate]}]
            return super().custom_query(query, params, timeout)

    got = read_observation(Router("3"), "ns", "svc", ["p"], 30)[CLIENT]
    assert (got.requests_per_s, got.mean_prompt_tokens) == (3.0, 1500.0)
    assert got.prompt_tokens_buckets == ((1024.0, 2.0), (float("inf"), 3.0))
    assert got.ttft_buckets is None and got.complete
    # scraped, nothing arrived: a rate of 0, no mean (0/0) and no distribution
    quiet = read_observation(Router("0"), "ns", "svc", ["p"], 30)[CLIENT]
    assert (quiet.requests_per_s, quiet.mean_prompt_tokens, quiet.prompt_tokens_buckets) == (0.0, None, None)
    # what it sent each pool lands on the pool; the engines' own readings are untouched
    pool = read_observation(Router("3"), "ns", "svc", ["p"], 30)["p"]
    assert pool.routed_per_s == 3.0 and pool.requests_per_s is None


def test_the_routers_prompt_buckets_are_the_engines_and_the_planners() -> None:
    """The planner reads the router's arrivals where it read the engines' histograms: the
    same bounds (vLLM's 1-2-5 series), or it loses resolution on long prompts."""
    from tandem.planner.lengths import BUCKETS
    from tandem.router.metrics import TOKEN_BUCKETS

    assert tuple(float(b) for b in TOKEN_BUCKETS) == BUCKETS == tuple(sorted(set(BUCKETS)))
