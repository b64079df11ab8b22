"""The router against simulated workers over real loopback HTTP: split and mixed paths by threshold,
streaming, config reload, failover (prefill, decode, mixed), timeouts, disconnects, saturation."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tandem.router.config import parse_config
from tandem.router.main import start_router
from tandem.router.server import Router
from tandem.sim.worker import SimWorker, WorkerSettings, filler_token, start_server
from tandem.sim.worker_engine import Role

pytestmark = pytest.mark.timeout(60)

MODEL = "llama-3.1-8b"
THRESHOLD = 256
SHORT = "short prompt"  # 3 tokens
LONG = "x" * 4 * 1000  # 1000 tokens


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in a Prometheus exposition; 0 if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def dead_address() -> str:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Setup:
    session: aiohttp.ClientSession
    runners: list[web.BaseRunner] = field(default_factory=list)
    workers: dict[str, SimWorker] = field(default_factory=dict)  # address -> worker
    router: Router | None = None
    url: str = ""

    async def worker(self, role: str, **overrides: Any) -> str:
        values: dict[str, Any] = {"model": MODEL, "role": Role(role), "time_scale": 0.02, "engine_id": role}
        values.update(overrides)
        worker = SimWorker(WorkerSettings(**values))
        runner, port = await start_server(worker, "127.0.0.1", 0)
        self.runners.append(runner)
        address = f"127.0.0.1:{port}"
        self.workers[address] = worker
        return address

    async def app(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    async def start_router(
        self, pools: dict[str, list[str]], config_path: Path | None = None, **extra: Any
    ) -> Router:
        doc = {"model": MODEL, "splitThresholdTokens": THRESHOLD, **extra}
        doc["pools"] = [{"name": role, "role": role, "endpoints": eps} for role, eps in pools.items()]
        if config_path is not None:
            config_path.write_text(json.dumps(doc))
        router = Router(parse_config(doc), config_path=config_path, reload_seconds=3600)
        runner, port = await start_router(router, "127.0.0.1", 0)
        self.runners.append(runner)
        self.router, self.url = router, f"http://127.0.0.1:{port}"
        return router

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def stream(self, path: str, body: dict[str, Any]) -> list[str]:
        async with self.session.post(self.url + path, json={**body, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = await resp.text()
        return [block.removeprefix("data: ") for block in text.split("\n\n") if block]

    async def metrics(self) -> str:
        async with self.session.get(self.url + "/metrics") as resp:
            return await resp.text()

    async def served(self, address: str) -> float:
        """Requests a worker finished (any reason but abort)."""
        async with self.session.get(f"http://{address}/metrics") as resp:
            text = await resp.text()
        return metric(text, "vllm:request_success_total", finished_reason="length")

    async def worker_metric(self, address: str, name: str, **labels: str) -> float:
        async with self.session.get(f"http://{address}/metrics") as resp:
            return metric(await resp.text(), name, **labels)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    s = Setup(session)
    yield s
    await session.close()
    for runner in reversed(s.runners):
        await runner.cleanup()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async def wait() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


async def full_setup(setup: Setup, **extra: Any) -> dict[str, str]:
    roles = {role: await setup.worker(role) for role in ("prefill", "decode", "mixed")}
    await setup.start_router({role: [address] for role, address in roles.items()}, **extra)
    return roles


# ------------------------------------------------------------------------------ paths


async def test_threshold_sends_short_prompts_to_mixed_and_long_ones_through_prefill_and_decode(
    setup: Setup,
) -> None:
    w = await full_setup(setup)
    status, body = await setup.post("/v1/completions", {"model": MODEL, "prompt": SHORT, "max_tokens": 5})
    assert status == 200
    assert body["choices"][0]["text"] == "".join(filler_token(i) for i in range(5))
    assert [await setup.served(w[r]) for r in ("prefill", "decode", "mixed")] == [0, 0, 1]

    status, body = await setup.post("/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 5})
    assert status == 200
    assert body["usage"] == {"prompt_tokens": 1000, "completion_tokens": 5, "total_tokens": 1005}
    # the prefill worker generated 1 token, the decode worker the 5, the mixed worker nothing new
    assert [await setup.served(w[r]) for r in ("prefill", "decode", "mixed")] == [1, 1, 1]
    assert await setup.worker_metric(w["prefill"], "vllm:generation_tokens_total") == 1
    assert await setup.worker_metric(w["decode"], "vllm:generation_tokens_total") == 5
    # the decode worker pulled the prompt's KV: it computed 1 prompt token, not 1000
    assert await setup.worker_metric(w["decode"], "vllm:iteration_tokens_total_sum") < 1000

    text = await setup.metrics()
    assert metric(text, "tandem_router_requests_total", path="mixed", code="200") == 1
    assert metric(text, "tandem_router_requests_total", path="split", code="200") == 1
    assert metric(text, "tandem_router_decisions_total", path="mixed", reason="below-threshold") == 1
    assert metric(text, "tandem_router_decisions_total", path="split", reason="above-threshold") == 1
    assert metric(text, "tandem_router_prompt_tokens_count", method="bytes") == 2
    assert metric(text, "tandem_router_prompt_tokens_sum", method="bytes") == 1003
    # what each pool was sent (the planner's offered load per pool): the split request twice
    for pool in ("prefill", "decode", "mixed"):
        assert metric(text, "tandem_router_dispatched_total", pool=pool, role=pool) == 1
    assert metric(text, "tandem_router_e2e_request_latency_seconds_count", path="split") == 1
    assert metric(text, "tandem_router_split_threshold_tokens") == THRESHOLD


async def test_chat_requests_split_by_threshold(setup: Setup) -> None:
    w = await full_setup(setup)
    long_chat = {"messages": [{"role": "user", "content": LONG}], "max_completion_tokens": 3}
    status, body = await setup.post("/v1/chat/completions", long_chat)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "".join(filler_token(i) for i in range(3))
    assert await setup.served(w["prefill"]) == 1 and await setup.served(w["decode"]) == 1
    assert await setup.worker_metric(w["prefill"], "vllm:generation_tokens_total") == 1


async def test_streaming_end_to_end_on_both_paths(setup: Setup) -> None:
    w = await full_setup(setup)
    for prompt, path in ((SHORT, "mixed"), (LONG, "split")):
        body = {"prompt": prompt, "max_tokens": 6, "stream_options": {"include_usage": True}}
        events = await setup.stream("/v1/completions", body)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["text"] for c in chunks[:-1]] == [filler_token(i) for i in range(6)]
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        text = await setup.metrics()
        assert metric(text, "tandem_router_time_to_first_token_seconds_count", path=path) == 1
    chat = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}
    events = await setup.stream("/v1/chat/completions", chat)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "".join(
        filler_token(i) for i in range(4)
    )
    assert await setup.served(w["decode"]) == 2 and await setup.served(w["mixed"]) == 1


async def test_threshold_and_pools_reload_without_restart(setup: Setup, tmp_path: Path) -> None:
    w = {role: await setup.worker(role) for role in ("prefill", "decode", "mixed")}
    config_path = tmp_path / "router.json"
    router = await setup.start_router({r: [a] for r, a in w.items()}, config_path=config_path)
    assert (await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 2}))[0] == 200
    assert await setup.served(w["decode"]) == 1
    # the planner raises the threshold: the operator rewrites the ConfigMap
    doc = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**doc, "splitThresholdTokens": 5000}))
    assert await router.reload_config()
    assert (await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 2}))[0] == 200
    assert await setup.served(w["mixed"]) == 1 and await setup.served(w["decode"]) == 1
    # a broken document is ignored; the previous config stays in force
    config_path.write_text("{ not json")
    assert not await router.reload_config()
    assert router.config.split_threshold_tokens == 5000
    text = await setup.metrics()
    assert metric(text, "tandem_router_config_reloads_total", result="ok") == 1
    assert metric(text, "tandem_router_config_reloads_total", result="error") == 1
    assert metric(text, "tandem_router_split_threshold_tokens") == 5000


async def test_saturated_prefill_pool_overflows_to_a_free_mixed_replica(setup: Setup) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def stalled_prefill(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"choices": [{"text": " x"}], "kv_transfer_params": None})

    app = web.Application()
    app.router.add_post("/v1/completions", stalled_prefill)
    prefill = await setup.app(app)
    decode, mixed = await setup.worker("decode"), await setup.worker("mixed")
    await setup.start_router(
        {"prefill": [prefill], "decode": [decode], "mixed": [mixed]},
        limits={"prefillInflightPerReplica": 1},
    )
    first = asyncio.create_task(setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 2}))
    await asyncio.wait_for(entered.wait(), 10)
    status, _ = await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 2})
    assert status == 200
    assert await setup.served(mixed) == 1  # overflowed while the prefill replica was busy
    release.set()
    status, _ = await first
    assert status == 200
    assert await setup.served(decode) == 1
    text = await setup.metrics()
    assert metric(text, "tandem_router_decisions_total", path="mixed", reason="prefill-saturated") == 1


async def test_load_others_put_on_a_replica_steers_the_routers_picks(setup: Setup) -> None:
    """Requests sent to a worker directly (another router, a client of the pool Service) show in
    its queue gauges; once the router reads them it sends its own requests elsewhere."""
    busy = await setup.worker("mixed", time_scale=1.0, engine_id="busy")  # slow: 1 model s per s
    idle = await setup.worker("mixed", engine_id="idle")
    router = await setup.start_router({"mixed": [busy, idle]}, disaggregation="never", loadPollSeconds=3600)
    body = {"prompt": SHORT, "max_tokens": 400}
    outside = [asyncio.create_task(_direct(setup, busy, body)) for _ in range(3)]
    try:
        await until(lambda: _running(setup, busy, 3))
        await router.poll_loads()
        by_address = {r.address: r for r in router.replicas.by_role["mixed"]}
        assert by_address[busy].outside == 3 and by_address[idle].outside == 0
        for _ in range(2):
            status, _ = await setup.post("/v1/completions", {"prompt": SHORT, "max_tokens": 2})
            assert status == 200
        assert await setup.served(idle) == 2
        assert await setup.served(busy) == 0  # the three outside requests are still running
    finally:
        for task in outside:
            task.cancel()
        await asyncio.gather(*outside, return_exceptions=True)


async def _direct(setup: Setup, address: str, body: dict[str, Any]) -> int:
    async with setup.session.post(f"http://{address}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def _running(setup: Setup, address: str, n: int) -> bool:
    return await setup.worker_metric(address, "vllm:num_requests_running") >= n


# ------------------------------------------------------------------------------ failover


async def test_prefill_failure_retries_on_another_prefill_replica(setup: Setup) -> None:
    prefill, decode, mixed = [await setup.worker(r) for r in ("prefill", "decode", "mixed")]
    await setup.start_router({"prefill": [dead_address(), prefill], "decode": [decode], "mixed": [mixed]})
    status, body = await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert await setup.served(prefill) == 1 and await setup.served(decode) == 1
    assert await setup.served(mixed) == 0
    text = await setup.metrics()
    assert metric(text, "tandem_router_retries_total", step="prefill") == 1
    assert metric(text, "tandem_router_upstream_errors_total", role="prefill", kind="connect") == 1
    assert metric(text, "tandem_router_requests_total", path="split", code="200") == 1


async def test_prefill_failing_twice_falls_back_to_a_mixed_replica(setup: Setup) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    app = web.Application()
    app.router.add_post("/v1/completions", broken)
    failing = await setup.app(app)
    decode, mixed = await setup.worker("decode"), await setup.worker("mixed")
    await setup.start_router({"prefill": [dead_address(), failing], "decode": [decode], "mixed": [mixed]})
    events = await setup.stream("/v1/completions", {"prompt": LONG, "max_tokens": 3})
    assert events[-1] == "[DONE]" and len(events) == 4
    assert await setup.served(mixed) == 1 and await setup.served(decode) == 0
    text = await setup.metrics()
    assert metric(text, "tandem_router_retries_total", step="prefill") == 1
    assert metric(text, "tandem_router_retries_total", step="fallback") == 1
    assert metric(text, "tandem_router_upstream_errors_total", role="prefill", kind="status") == 1
    assert metric(text, "tandem_router_requests_total", path="mixed", code="200") == 1
    # the failed replicas are skipped for a while: the next long request goes to mixed directly
    assert (await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 1}))[0] == 200
    assert metric(await setup.metrics(), "tandem_router_decisions_total", reason="prefill-saturated") == 1


async def test_decode_failure_retries_decode_elsewhere(setup: Setup) -> None:
    prefill, decode, mixed = [await setup.worker(r) for r in ("prefill", "decode", "mixed")]
    await setup.start_router({"prefill": [prefill], "decode": [dead_address(), decode], "mixed": [mixed]})
    events = await setup.stream("/v1/completions", {"prompt": LONG, "max_tokens": 4})
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [filler_token(i) for i in range(4)]
    assert await setup.served(prefill) == 1 and await setup.served(decode) == 1
    assert await setup.served(mixed) == 0
    text = await setup.metrics()
    assert metric(text, "tandem_router_retries_total", step="decode") == 1
    assert metric(text, "tandem_router_upstream_errors_total", role="decode", kind="connect") == 1
    assert metric(text, "tandem_router_requests_total", path="split", code="200") == 1


async def test_decode_failing_everywhere_recomputes_on_a_mixed_replica(setup: Setup) -> None:
    prefill, mixed = await setup.worker("prefill"), await setup.worker("mixed")
    await setup.start_router({"prefill": [prefill], "decode": [dead_address()], "mixed": [mixed]})
    status, body = await setup.post("/v1/completions", {"prompt": LONG, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert await setup.served(mixed) == 1
    text = await setup.metrics()
    assert metric(text, "tandem_router_retries_total", step="fallback") == 1
    assert metric(text, "tandem_router_requests_total", path="mixed", code="200") == 1


async def test_mixed_failure_retries_once_then_answers_with_an_openai_error(setup: Setup) -> None:
    mixed = await setup.worker("mixed")
    await setup.start_router({"mixed": [dead_address(), mixed]})
    assert (await setup.post("/v1/completions", {"prompt": SHORT, "max_tokens": 1}))[0] == 200
    assert metric(await setup.metrics(), "tandem_router_retries_total", step="mixed") == 1
    await setup.start_router({"mixed": [dead_address(), dead_address()]})
    status, body = await setup.post("/v1/completions", {"prompt": SHORT})
    assert status == 502
    assert body["error"]["type"] == "upstream_error" and body["error"]["code"] == 502
    assert isinstance(body["error"]["message"], str)


async def test_a_hanging_upstream_is_bounded_by_the_timeouts(setup: Setup) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"text": " first"}]}\n\n')
        await asyncio.Event().wait()  # never answers (cancelled when the router gives up)
        raise AssertionError

    app = web.Application()
    app.router.add_post("/v1/completions", hang)
    hanging = await setup.app(app)
    await setup.start_router({"mixed": [hanging]}, timeouts={"decodeSeconds": 0.3, "connectSeconds": 1})
    status, body = await setup.post("/v1/completions", {"prompt": SHORT})
    assert status == 502 and body["error"]["type"] == "upstream_error"
    # streaming: the first chunk arrives, then the stream ends with an error event
    events = await setup.stream("/v1/completions", {"prompt": SHORT})
    assert json.loads(events[0])["choices"][0]["text"] == " first"
    assert "error" in json.loads(events[-1])
    text = await setup.metrics()
    assert metric(text, "tandem_router_upstream_errors_total", role="mixed", kind="timeout") == 2


async def test_a_stream_broken_midway_ends_with_an_error_event(setup: Setup) -> None:
    async def break_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": " one"}]}\n\n')
        assert request.transport is not None
        request.transport.close()  # the worker dies mid-stream
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", break_midway)
    await setup.start_router({"mixed": [await setup.app(app)]})
    events = await setup.stream("/v1/completions", {"prompt": SHORT})
    assert json.loads(events[0])["choices"][0]["text"] == " one"
    assert json.loads(events[-1])["error"]["type"] == "upstream_error"
    assert metric(await setup.metrics(), "tandem_router_upstream_errors_total", kind="stream") == 1


async def test_client_disconnect_cancels_the_upstream_request(setup: Setup) -> None:
    prefill = await setup.worker("prefill")
    decode = await setup.worker("decode", time_scale=1.0)  # ~7 ms a token: the stream lasts seconds
    await setup.start_router({"prefill": [prefill], "decode": [decode]})
    async with setup.session.post(
        setup.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 2000, "stream": True}
    ) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # the first token arrived
    # the client went away: the router closes its upstream stream and the decode worker aborts
    engine = setup.workers[decode].engine

    async def idle() -> bool:
        return not engine.running and engine.num_waiting == 0 and engine.blocks.usage == 0

    await until(idle)
    assert await setup.worker_metric(decode, "vllm:generation_tokens_total") < 2000

    async def drained() -> bool:
        return all(
            r["inflight"] == 0
            for r in (await (await setup.session.get(setup.url + "/router/state")).json())["replicas"]
        )

    await until(drained)
    assert metric(await setup.metrics(), "tandem_router_requests_total", code="499") == 1


async def test_client_errors_pass_through_without_retries(setup: Setup) -> None:
    w = await full_setup(setup)
    status, body = await setup.post("/v1/completions", {"model": "no-such-model", "prompt": LONG})
    assert status == 404 and "does not exist" in body["message"]  # the worker's own answer
    status, body = await setup.post("/v1/completions", {"prompt": SHORT, "max_tokens": -1})
    assert status == 400
    text = await setup.metrics()
    assert metric(text, "tandem_router_retries_total", step="prefill") == 0
    assert metric(text, "tandem_router_upstream_errors_total", role="prefill", kind="status") == 0
    assert await setup.served(w["decode"]) == 0


async def test_models_health_and_request_errors(setup: Setup) -> None:
    await full_setup(setup)
    async with setup.session.get(setup.url + "/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == MODEL
    async with setup.session.get(setup.url + "/health") as resp:
        assert resp.status == 200
    async with setup.session.get(setup.url + "/ready") as resp:
        assert resp.status == 200
    async with setup.session.post(setup.url + "/v1/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    # a pool with no replicas yet (discovery pending): 503 with an OpenAI error, never a hang
    await setup.start_router({"mixed": []})
    status, body = await setup.post("/v1/completions", {"prompt": SHORT})
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    async with setup.session.get(setup.url + "/ready") as resp:
        assert resp.status == 503
    async with setup.session.get(setup.url + "/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == MODEL  # from the config
