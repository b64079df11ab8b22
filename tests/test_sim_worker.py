"""The simulated worker over real loopback HTTP: OpenAI shapes, streaming, the P/D two-step protocol,
vLLM's metrics, load, KV usage, disconnects and the time scale."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tandem.perf import model as perf
from tandem.perf.catalog import get_accelerator
from tandem.perf.models import get_model
from tandem.sim.worker import (
    SimWorker,
    WorkerSettings,
    count_chat_tokens,
    estimate_text_tokens,
    filler_token,
    parse_settings,
    start_server,
)
from tandem.sim.worker_engine import KvFetch, Role
from tandem.sim.worker_metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, build_1_2_5_buckets

TIME_SCALE = 0.02
MODEL = "llama-3.1-8b"


@dataclass
class Running:
    worker: SimWorker
    url: str
    session: aiohttp.ClientSession

    async def post(self, path: str, body: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.url + path, json=body, **kw) as resp:
            return resp.status, await resp.json()

    async def stream(self, path: str, body: dict[str, Any]) -> list[str]:
        """The SSE ``data:`` payloads of a streaming response, in order."""
        async with self.session.post(self.url + path, json={**body, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = await resp.text()
        events = [block for block in text.split("\n\n") if block]
        assert all(e.startswith("data: ") for e in events)
        return [e.removeprefix("data: ") for e in events]

    async def metrics(self) -> dict[str, Metric]:
        async with self.session.get(self.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {family.name: family for family in text_string_to_metric_families(text)}

    async def value(self, name: str, **labels: str) -> float:
        return sample_value(await self.metrics(), name, **labels)


def sample_value(families: dict[str, Metric], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(sample_name)


WorkerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_worker() -> AsyncIterator[WorkerFactory]:
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def start(kv_fetcher: Any = None, **overrides: Any) -> Running:
        values: dict[str, Any] = {"model": MODEL, "accelerator": "h100", "time_scale": TIME_SCALE}
        values.update(overrides)
        worker = SimWorker(WorkerSettings(**values), kv_fetcher=kv_fetcher)
        runner, port = await start_server(worker, "127.0.0.1", 0)
        runners.append(runner)
        return Running(worker, f"http://127.0.0.1:{port}", session)

    yield start
    await session.close()
    for runner in runners:
        await runner.cleanup()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async def wait() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


# ------------------------------------------------------------------------------ OpenAI surface


async def test_completion(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    status, body = await w.post("/v1/completions", {"model": MODEL, "prompt": "abcd" * 10, "max_tokens": 5})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["text"] == "".join(filler_token(i) for i in range(5))
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert body["kv_transfer_params"] is None


async def test_completion_defaults_and_token_id_prompts(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    _, body = await w.post("/v1/completions", {"prompt": list(range(33))})
    assert body["usage"] == {"prompt_tokens": 33, "completion_tokens": 16, "total_tokens": 49}
    _, body = await w.post("/v1/completions", {"prompt": [[1, 2, 3]], "max_tokens": 1})
    assert body["usage"]["prompt_tokens"] == 3


async def test_streaming_completion_with_usage(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    body = {"prompt": "hello", "max_tokens": 4, "stream_options": {"include_usage": True}}
    events = await w.stream("/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert texts == [filler_token(i) for i in range(4)]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


async def test_streaming_without_usage_has_no_usage_chunk(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    events = await w.stream("/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    assert len(events) == 3


async def test_chat_completion(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    status, body = await w.post("/v1/chat/completions", {"messages": messages, "max_completion_tokens": 3})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " the quick brown"}
    assert choice["finish_reason"] == "length"
    expected_prompt = 3 + 2 * 4 + estimate_text_tokens("be brief") + estimate_text_tokens("hello there")
    assert body["usage"]["prompt_tokens"] == expected_prompt == count_chat_tokens({"messages": messages})


async def test_streaming_chat(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
    }
    events = await w.stream("/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1])
    assert content == " the quick brown"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_models_health_ready_info(start_worker: WorkerFactory) -> None:
    w = await start_worker(served_model_name="meta-llama/Llama-3.1-8B-Instruct", role=Role.DECODE, tp=2)
    async with w.session.get(w.url + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert models["data"][0]["max_model_len"] == w.worker.engine.config.max_model_len
    for path in ("/health", "/ready", "/readyz"):
        async with w.session.get(w.url + path) as resp:
            assert resp.status == 200, path
    async with w.session.get(w.url + "/sim/info") as resp:
        info = await resp.json()
    assert (info["role"], info["tp"], info["accelerator"]) == ("decode", 2, "h100")
    capacity = perf.kv_capacity_tokens(get_accelerator("h100"), get_model(MODEL), 2)
    assert info["num_gpu_blocks"] == capacity // 16
    # the served name and the preset name are both accepted
    status, _ = await w.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200


async def test_bad_requests(start_worker: WorkerFactory) -> None:
    w = await start_worker(max_model_len=64)
    status, body = await w.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert (status, body["type"]) == (404, "NotFoundError")
    status, body = await w.post("/v1/completions", {"prompt": list(range(60)), "max_tokens": 10})
    assert status == 400 and "maximum context length is 64" in body["message"]
    status, _ = await w.post("/v1/completions", {"prompt": "x", "n": 2})
    assert status == 400
    status, _ = await w.post("/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert status == 400
    status, _ = await w.post("/v1/chat/completions", {"messages": []})
    assert status == 400
    async with w.session.post(w.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400


# --------------------------------------------------------------------------- P/D disaggregation


class RecordingFetcher:
    def __init__(self) -> None:
        self.fetches: list[KvFetch] = []

    async def fetch(self, fetch: KvFetch) -> None:
        self.fetches.append(fetch)


async def test_prefill_then_decode_two_step_protocol(start_worker: WorkerFactory) -> None:
    """The toy proxy's two steps: P with do_remote_decode and max_tokens=1, then D with P's params."""
    prefill = await start_worker(role=Role.PREFILL, engine_id="prefill-0", kv_host="10.1.2.3", kv_port=5601)
    fetcher = RecordingFetcher()
    decode = await start_worker(role=Role.DECODE, engine_id="decode-0", kv_fetcher=fetcher)
    prompt = list(range(1000))
    proxy_p = {
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    status, p_body = await prefill.post("/v1/completions", proxy_p, headers={"X-Request-Id": "req-42"})
    assert status == 200
    assert p_body["usage"]["completion_tokens"] == 1
    params = p_body["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "prefill-0"
    assert (params["remote_host"], params["remote_port"], params["tp_size"]) == ("10.1.2.3", 5601, 1)
    assert params["remote_request_id"].startswith("cmpl-req-42-")
    assert sum(len(group) for group in params["remote_block_ids"]) == math.ceil(1000 / 16)

    d_body = {"prompt": prompt, "max_tokens": 8, "kv_transfer_params": params}
    events = await decode.stream("/v1/completions", {**d_body, "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "".join(filler_token(i) for i in range(8))
    assert chunks[-1]["usage"] == {"prompt_tokens": 1000, "completion_tokens": 8, "total_tokens": 1008}

    # D pulled the KV through the fetcher hook, into blocks for the whole prompt ...
    (fetch,) = fetcher.fetches
    assert fetch.params["remote_engine_id"] == "prefill-0"
    assert fetch.num_tokens == 1000 and len(fetch.local_block_ids) == math.ceil(1000 / 16)
    # ... and computed only the last prompt token and the decodes; P computed the prompt.
    p_metrics, d_metrics = await prefill.metrics(), await decode.metrics()
    assert sample_value(p_metrics, "vllm:iteration_tokens_total_sum") == 1000
    assert sample_value(d_metrics, "vllm:iteration_tokens_total_sum") == 8
    assert sample_value(p_metrics, "vllm:generation_tokens_total") == 1
    assert sample_value(d_metrics, "vllm:generation_tokens_total") == 8
    assert sample_value(d_metrics, "vllm:prompt_tokens_total") == 1000
    # P released the blocks it held for D once the modelled transfer time passed
    await until(lambda: _equals(prefill.value("vllm:kv_cache_usage_perc"), 0.0))


async def test_default_fetcher_models_the_transfer_time(start_worker: WorkerFactory) -> None:
    decode = await start_worker(role=Role.DECODE)
    params = {"do_remote_prefill": True, "remote_block_ids": [list(range(250))], "remote_engine_id": "p"}
    _, body = await decode.post(
        "/v1/completions", {"prompt": list(range(4000)), "max_tokens": 2, "kv_transfer_params": params}
    )
    assert body["usage"]["completion_tokens"] == 2
    transfer = perf.kv_transfer_seconds(get_model(MODEL), 4000, 25.0, pipelined=False)
    ttft = await decode.value("vllm:time_to_first_token_seconds_sum")
    assert ttft >= transfer  # model seconds: the pull comes before the first token


async def test_requests_without_kv_params_are_served_normally_on_every_role(
    start_worker: WorkerFactory,
) -> None:
    for role in Role:
        w = await start_worker(role=role)
        _, body = await w.post("/v1/completions", {"prompt": list(range(100)), "max_tokens": 3})
        assert body["usage"]["completion_tokens"] == 3
        assert body["kv_transfer_params"] is None
        assert await w.value("vllm:iteration_tokens_total_sum") == 100 + 2


# ------------------------------------------------------------------------------------- metrics

REQUIRED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_success": "counter",
    "vllm:cache_config_info": "gauge",
}


def bucket_bounds(family: Metric) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]


async def test_metrics_names_types_labels_and_buckets(start_worker: WorkerFactory) -> None:
    w = await start_worker(
        served_model_name="llama-8b", engine_index="0", max_model_len=4096, num_gpu_blocks=500
    )
    for _ in range(3):
        await w.post("/v1/completions", {"prompt": list(range(50)), "max_tokens": 4})
    families = await w.metrics()
    for name, kind in REQUIRED.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            if name != "vllm:cache_config_info":
                assert sample.labels["model_name"] == "llama-8b", sample
            assert sample.labels["engine"] == "0", sample
    inf = float("inf")
    assert bucket_bounds(families["vllm:time_to_first_token_seconds"]) == [*TTFT_BUCKETS, inf]
    assert bucket_bounds(families["vllm:time_to_first_token_seconds"])[:3] == [0.001, 0.005, 0.01]
    assert bucket_bounds(families["vllm:inter_token_latency_seconds"]) == [*ITL_BUCKETS, inf]
    assert bucket_bounds(families["vllm:inter_token_latency_seconds"])[0] == 0.01
    assert bucket_bounds(families["vllm:e2e_request_latency_seconds"]) == [*REQUEST_LATENCY_BUCKETS, inf]
    assert bucket_bounds(families["vllm:e2e_request_latency_seconds"])[-2] == 7680.0
    prompt_bounds = bucket_bounds(families["vllm:request_prompt_tokens"])
    assert (
        prompt_bounds
        == [*build_1_2_5_buckets(4096), inf]
        == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, inf]
    )

    assert sample_value(families, "vllm:prompt_tokens_total") == 150
    assert sample_value(families, "vllm:generation_tokens_total") == 12
    assert sample_value(families, "vllm:request_success_total", finished_reason="length") == 3
    assert sample_value(families, "vllm:request_success_total", finished_reason="stop") == 0
    assert sample_value(families, "vllm:time_to_first_token_seconds_count") == 3
    assert sample_value(families, "vllm:inter_token_latency_seconds_count") == 9
    assert sample_value(families, "vllm:e2e_request_latency_seconds_count") == 3
    assert sample_value(families, "vllm:request_prompt_tokens_sum") == 150
    assert sample_value(families, "vllm:request_generation_tokens_sum") == 12
    assert sample_value(families, "vllm:num_requests_running") == 0
    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels["num_gpu_blocks"] == "500" and info.labels["block_size"] == "16"


async def test_inter_token_latency_is_model_time_at_any_time_scale(start_worker: WorkerFactory) -> None:
    """ITL is reported in model seconds: exactly the performance model's decode step, whatever the
    time scale (no wall-clock assertion: the clock is frozen between back-to-back iterations)."""
    acc, arch = get_accelerator("h100"), get_model(MODEL)
    prompt, max_tokens = 200, 6
    expected = sum(
        perf.decode_step_seconds(acc, arch, 1, 1, prompt + k) for k in range(1, max_tokens)
    )  # token k+1 computes the KV of token k: context prompt + k
    for scale in (0.01, 0.05):
        w = await start_worker(time_scale=scale)
        await w.post("/v1/completions", {"prompt": list(range(prompt)), "max_tokens": max_tokens})
        assert await w.value("vllm:inter_token_latency_seconds_count") == max_tokens - 1
        assert await w.value("vllm:inter_token_latency_seconds_sum") == pytest.approx(expected, rel=1e-9)
        ttft = await w.value("vllm:time_to_first_token_seconds_sum")
        assert ttft >= perf.prefill_seconds(acc, arch, 1, prompt) * (1 - 1e-9)


# ---------------------------------------------------------------------------- load and capacity


async def test_waiting_and_running_under_load(start_worker: WorkerFactory) -> None:
    w = await start_worker(max_num_seqs=2, time_scale=0.1)  # slow enough to watch the queue
    body = {"prompt": list(range(64)), "max_tokens": 400}
    tasks = [asyncio.create_task(w.post("/v1/completions", body)) for _ in range(5)]

    async def saturated() -> bool:
        families = await w.metrics()
        running = sample_value(families, "vllm:num_requests_running")
        waiting = sample_value(families, "vllm:num_requests_waiting")
        return (running, waiting) == (2, 3)

    await until(saturated)
    results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200] * 5
    families = await w.metrics()
    assert sample_value(families, "vllm:num_requests_running") == 0
    assert sample_value(families, "vllm:num_requests_waiting") == 0
    assert sample_value(families, "vllm:request_success_total", finished_reason="length") == 5
    # requests that queued report it: some queue time was observed
    assert sample_value(families, "vllm:request_queue_time_seconds_sum") > 0


async def test_kv_cache_usage_follows_blocks(start_worker: WorkerFactory) -> None:
    w = await start_worker(num_gpu_blocks=100, max_model_len=1600, time_scale=0.1)
    task = asyncio.create_task(w.post("/v1/completions", {"prompt": list(range(640)), "max_tokens": 900}))

    async def in_use() -> bool:
        usage = await w.value("vllm:kv_cache_usage_perc")
        return usage >= 0.41  # 640 prompt tokens = 40 blocks, plus the growing output

    await until(in_use)
    # a second request whose prompt needs 70 more blocks cannot be admitted: it waits
    second = asyncio.create_task(w.post("/v1/completions", {"prompt": list(range(1100)), "max_tokens": 1}))

    async def blocked() -> bool:
        families = await w.metrics()
        return sample_value(families, "vllm:num_requests_waiting") == 1

    await until(blocked)
    assert (await task)[0] == 200
    assert (await second)[0] == 200
    await until(lambda: _equals(w.value("vllm:kv_cache_usage_perc"), 0.0))


async def test_client_disconnect_aborts_the_request(start_worker: WorkerFactory) -> None:
    w = await start_worker(max_num_seqs=1)
    body = {"prompt": list(range(100)), "max_tokens": 5000, "stream": True}
    resp = await w.session.post(w.url + "/v1/completions", json=body)
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    assert w.worker.engine.running
    resp.close()  # the client goes away mid-stream
    await until(lambda: _engine_idle(w))
    # the slot is free: a new request runs to completion
    status, done = await w.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200 and done["usage"]["completion_tokens"] == 2
    assert await w.value("vllm:request_success_total", finished_reason="length") == 1


async def test_non_streaming_client_timeout_aborts_the_request(start_worker: WorkerFactory) -> None:
    w = await start_worker()
    body = {"prompt": list(range(100)), "max_tokens": 5000}
    request = asyncio.create_task(w.post("/v1/completions", body))
    await until(lambda: _has_running(w))
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await until(lambda: _engine_idle(w))
    assert await w.value("vllm:kv_cache_usage_perc") == 0.0


async def _engine_idle(w: Running) -> bool:
    engine = w.worker.engine
    return not engine.running and engine.num_waiting == 0 and engine.blocks.usage == 0


async def _has_running(w: Running) -> bool:
    return bool(w.worker.engine.running)


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


# ------------------------------------------------------------------------------------- settings


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_SIM_PORT", "9001")
    monkeypatch.setenv("TANDEM_SIM_ROLE", "decode")
    monkeypatch.setenv("TANDEM_SIM_TIME_SCALE", "0.1")
    monkeypatch.setenv("TANDEM_SIM_ACCELERATOR", "mi300x")
    settings, level = parse_settings(["--role", "prefill", "--tp", "4"])
    assert settings.port == 9001
    assert settings.role is Role.PREFILL  # the flag wins over the env
    assert settings.time_scale == 0.1
    assert (settings.accelerator, settings.tp) == ("mi300x", 4)
    assert level == "INFO"
    defaults, _ = parse_settings([])
    assert defaults.model == "llama-3.1-8b"
    monkeypatch.delenv("TANDEM_SIM_PORT")
    assert parse_settings([])[0].port == 8000
    with pytest.raises(SystemExit):
        parse_settings(["--time-scale", "0"])
