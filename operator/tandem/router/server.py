"""The router's HTTP side: an OpenAI-compatible proxy in front of one InferenceService's pools.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming and not) are routed per
request by `tandem.router.decide`; ``GET /v1/models`` is answered by a replica (or from the config
when none answers). ``GET /health`` (liveness: the process serves), ``GET /ready`` (503 until some
replica is known), ``GET /metrics`` and ``GET /router/state`` (replicas and their loads) complete it.

The split path is vLLM's NIXL-connector two-step protocol (the toy proxy in vLLM's
``tests/v1/kv_connector/nixl_integration`` is the reference): the request goes to a prefill replica
with ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params: {"do_remote_decode": true}``;
the ``kv_transfer_params`` of its answer go with the original request to a decode replica, whose
response (streamed or not) is the client's. Both steps carry the same ``X-Request-Id``.

Failures (nothing has been sent to the client yet unless said otherwise):

* a prefill replica fails (connection, timeout, 5xx) -> the prefill is retried once on another
  prefill replica, then the whole request goes to one replica (mixed pool first);
* a decode replica fails -> the decode is retried once on another decode replica, then the whole
  request goes to one replica;
* a mixed-path replica fails -> retried once on another replica;
* an upstream 4xx is the client's problem: passed through as is, no retry;
* a failure after streaming started ends the stream with an OpenAI-style ``error`` event;
* the client going away cancels the handler (aiohttp's handler cancellation), which closes the
  upstream connection, which aborts the request in the worker;
* every upstream call is bounded: connect by ``timeouts.connectSeconds``, the prefill step by
  ``timeouts.prefillSeconds``, a decode or whole-request call by ``timeouts.decodeSeconds``.

A replica that failed is skipped for `FAILURE_COOLDOWN_SECONDS` unless nothing else is left.
Error bodies follow OpenAI: ``{"error": {"message", "type", "param", "code"}}``.

The client edge (tests/test_router_security.py): a body over `MAX_REQUEST_BYTES` gets 413; a body
that is not a JSON object, or whose ``prompt``/``messages``/``model``/``stream``/token limits have
the wrong type, gets 400 before any replica is called. Only `FORWARDED_HEADERS` go upstream, minus
any the client names in ``Connection`` (hop-by-hop by RFC 9110 section 7.6.1); ``Authorization`` is
forwarded on purpose (the workers' ``--api-key``), ``Proxy-Authorization`` and ``Cookie`` never.
Of an upstream answer only ``Content-Type`` is relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tandem.router.config import DEFAULT_LOAD_POLL_SECONDS, ConfigError, RouterConfig, load_config
from tandem.router.decide import (
    Decision,
    Policy,
    ReplicaState,
    RoutePath,
    decide,
    pick_replica,
    pick_single,
)
from tandem.router.discovery import KubeDiscovery, OnChange
from tandem.router.load import STALE_INTERVALS, engine_queue, outside_load
from tandem.router.metrics import CONTENT_TYPE, RouterMetrics
from tandem.router.replicas import ReplicaTable
from tandem.router.tokens import TokenCounter, load_counter
from tandem.router.upstream import Response, UpstreamClient, UpstreamError

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.http import RawRequestMessage
    from aiohttp.streams import StreamReader

    RequestFactory = Callable[
        [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter, asyncio.Task[None]],
        web.BaseRequest,
    ]

logger = logging.getLogger(__name__)

FAILURE_COOLDOWN_SECONDS = 5.0
DEFAULT_RELOAD_SECONDS = 2.0  # kubelet refreshes a mounted ConfigMap within about a minute anyway
MODELS_TIMEOUT_SECONDS = 5.0
CLIENT_CLOSED = "499"  # nginx's code for "the client closed the request"
FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate")
INFERENCE_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_MAX_ERROR_BODY = 4096
# 16 MiB: a 1M-token prompt is about 4 MB of text; anything larger is not a completion request.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_FAILED = object()  # sentinel: every prefill attempt failed

monotonic = time.monotonic
perf_counter = time.perf_counter


class UpstreamFailure(Exception):
    """An upstream call failed in a way another replica may not (retryable)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | status


def error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, kind), content_type="application/json"
    )


def sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": 502}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Exchange:
    """One client request in flight through the router."""

    __slots__ = ("body", "chat", "headers", "path", "raw", "request", "start", "stream", "tokens")

    def __init__(
        self, request: web.BaseRequest, path: str, raw: bytes, body: dict[str, Any], tokens: int, chat: bool
    ) -> None:
        self.request = request
        self.path = path
        self.raw = raw
        self.body = body
        self.tokens = tokens
        self.chat = chat
        self.stream = bool(body.get("stream"))
        self.start = perf_counter()
        headers = request.headers
        forwarded = {"content-type": "application/json"}
        for name in FORWARDED_HEADERS:
            value = headers.get(name)
            if value is not None:
                forwarded[name] = value
        if len(forwarded) > 1 and "Connection" in headers:
            hop_by_hop = {
                token.strip().lower() for value in headers.getall("Connection") for token in value.split(",")
            }
            forwarded = {name: value for name, value in forwarded.items() if name not in hop_by_hop}
            forwarded["content-type"] = "application/json"
        self.headers = forwarded

    def output_tokens(self) -> int:
        value = self.body.get("max_completion_tokens") if self.chat else None
        if value is None:
            value = self.body.get("max_tokens")
        return value if isinstance(value, int) and value > 0 else 16


class Router:
    """The router: config, replica table, upstream client and the aiohttp application."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        config_path: str | Path | None = None,
        reload_seconds: float = DEFAULT_RELOAD_SECONDS,
        counter: TokenCounter | None = None,
        kube: KubeDiscovery | None = None,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.reload_seconds = reload_seconds
        self.metrics = RouterMetrics()
        self.replicas = ReplicaTable()
        self.counter = counter or TokenCounter()
        self._counter_for: str | None = None if counter is None else config.tokenizer
        self.kube = kube
        self.client: UpstreamClient | None = None
        self.policy = Policy()
        self._seq = 0
        self._last_text: bytes | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._get_handlers: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] = {
            "/v1/models": self.handle_models,
            "/health": self.handle_health,
            "/ready": self.handle_ready,
            "/metrics": self.handle_metrics,
            "/router/state": self.handle_state,
        }
        self.apply_config(config)

    # ------------------------------------------------------------------------------ config

    def apply_config(self, config: RouterConfig) -> None:
        """Make ``config`` the one in force (synchronous; no I/O except starting watches)."""
        self.config = config
        self.policy = Policy(
            disaggregation=config.disaggregation,
            split_threshold_tokens=config.split_threshold_tokens,
            prefill_inflight_limit=config.limits.prefill_inflight_per_replica,
            mixed_inflight_limit=config.limits.mixed_inflight_per_replica,
        )
        # Connect is bounded by the client; the whole call by asyncio.timeout around it
        # (prefillSeconds or decodeSeconds).
        if self.client is not None:
            self.client.connect_seconds = config.timeouts.connect_seconds
        self.replicas.configure(config.pools)
        wanted: dict[tuple[str, str, str, int], OnChange] = {}
        for pool in config.pools:
            if pool.endpoints is not None:
                self.replicas.set_endpoints(pool.name, pool.endpoints)
            else:
                wanted[(pool.name, config.namespace, pool.service, pool.port)] = self._on_endpoints(pool.name)
        if wanted or self.kube is not None:
            with contextlib.suppress(RuntimeError):  # no running loop yet: started in `start`
                self._sync_kube(wanted, asyncio.get_running_loop())
        self._pending_kube = wanted
        self.metrics.split_threshold.set(config.split_threshold_tokens)
        self._update_replica_gauges()

    def _sync_kube(
        self, wanted: Mapping[tuple[str, str, str, int], OnChange], loop: asyncio.AbstractEventLoop
    ) -> None:
        if self.kube is None:
            if not wanted:
                return
            self.kube = KubeDiscovery()
        self.kube.sync(wanted, loop)

    def _on_endpoints(self, pool: str) -> OnChange:
        def update(addresses: list[str]) -> None:
            if self.replicas.set_endpoints(pool, addresses):
                logger.info("Updated replicas of pool %s: %s", pool, ", ".join(addresses) or "none")
                self._update_replica_gauges()

        return update

    def _update_replica_gauges(self) -> None:
        self.metrics.replicas.clear()
        for pool, replicas in self.replicas.by_pool.items():
            self.metrics.replicas.labels(pool, self.replicas.pool_roles[pool]).set(len(replicas))

    async def reload_config(self) -> bool:
        """Re-read the config file; apply it if it changed and parses. Returns True if applied."""
        if self.config_path is None:
            return False
        try:
            text = await asyncio.to_thread(self.config_path.read_bytes)
        except OSError as exc:
            logger.warning("Failed to read router config %s: %s", self.config_path, exc)
            return False
        if text == self._last_text:
            return False
        self._last_text = text
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            logger.error("Kept the previous router config: %s", exc)
            return False
        if config == self.config:
            return False
        if config.tokenizer != self._counter_for:
            self.counter = await asyncio.to_thread(load_counter, config.tokenizer)
            self._counter_for = config.tokenizer
        self.apply_config(config)
        self.metrics.config_reloads.labels("ok").inc()
        logger.info(
            "Reloaded router config: %d pools, split threshold %d tokens, disaggregation %s",
            len(config.pools),
            config.split_threshold_tokens,
            config.disaggregation,
        )
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                await self.reload_config()
            except Exception:  # keep reloading whatever happened once
                logger.exception("Failed to reload the router config")

    async def poll_loads(self) -> None:
        """One reading of every replica's engine queue (`tandem.router.load`)."""
        replicas = [r for rs in self.replicas.by_role.values() for r in rs]
        await asyncio.gather(*(self._poll_load(r) for r in replicas))

    async def _poll_load(self, replica: ReplicaState) -> None:
        assert self.client is not None
        timeout = min(1.0, max(0.1, self.config.load_poll_seconds))
        try:
            async with asyncio.timeout(timeout):
                resp = await self.client.request(replica.address, "GET", "/metrics", {})
                try:
                    text = (await resp.read()).decode("utf-8", "replace")
                finally:
                    resp.close()
        except (TimeoutError, UpstreamError):
            return  # stale after STALE_INTERVALS: the router's own count alone
        queue = engine_queue(text) if resp.status == 200 else None
        if queue is not None:
            replica.outside = outside_load(queue, replica.inflight)
            replica.outside_at = monotonic()

    async def _load_loop(self) -> None:
        while True:
            every = self.config.load_poll_seconds
            await asyncio.sleep(every or DEFAULT_LOAD_POLL_SECONDS)
            try:
                if every:
                    await self.poll_loads()
                stale = monotonic() - STALE_INTERVALS * (every or DEFAULT_LOAD_POLL_SECONDS)
                for replicas in self.replicas.by_role.values():
                    for r in replicas:
                        if r.outside and (not every or r.outside_at < stale):
                            r.outside = 0
            except Exception:  # keep polling whatever happened once
                logger.exception("Failed to read the replicas' engine queues")

    # ------------------------------------------------------------------------------ lifecycle

    def build_server(self) -> web.Server:
        """aiohttp's low-level server with `dispatch` as its one handler (no router table, no
        middlewares: the routes are two dict lookups). Call from a running loop; `start` and `close`
        are the caller's (`tandem.router.main.RouterRunner` does both)."""
        return web.Server(
            self.dispatch,
            request_factory=_request_factory(asyncio.get_running_loop()),
            handler_cancellation=True,
            access_log=None,
        )

    async def start(self) -> None:
        """Before serving: the upstream client, the tokenizer, watches and the config reload loop."""
        self.client = UpstreamClient(self.config.timeouts.connect_seconds)
        if self._counter_for != self.config.tokenizer:
            self.counter = await asyncio.to_thread(load_counter, self.config.tokenizer)
            self._counter_for = self.config.tokenizer
        if self._pending_kube:
            await asyncio.to_thread(self._sync_kube, self._pending_kube, asyncio.get_running_loop())
        if self.config_path is not None:
            self._last_text = await asyncio.to_thread(self.config_path.read_bytes)
            self._reload_task = asyncio.create_task(self._reload_loop())
        self._load_task = asyncio.create_task(self._load_loop())
        logger.info(
            "Started router for %s: %d pools, %d static replicas, split threshold %d tokens (%s counts)",
            self.config.model,
            len(self.config.pools),
            self.replicas.count(),
            self.config.split_threshold_tokens,
            self.counter.method,
        )

    async def close(self) -> None:
        """After serving: stop the reload loop and watches, close upstream connections."""
        for task in (self._reload_task, self._load_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.kube is not None:
            self.kube.stop()
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------------------------ dispatch

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """The one handler: inference POSTs first, then the small GET (and HEAD) endpoints; 405 for
        a known path with another method, 404 for any other path."""
        path = request.path
        method = request.method
        chat = INFERENCE_PATHS.get(path)
        if chat is not None:
            if method == "POST":
                return await self._handle(request, path, chat=chat)
            return _status_response(405, "POST")
        handler = self._get_handlers.get(path)
        if handler is None:
            return _status_response(404)
        if method in ("GET", "HEAD"):
            return await handler(request)
        return _status_response(405, "GET,HEAD")

    # ------------------------------------------------------------------------------ small handlers

    async def handle_health(self, _request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    async def handle_ready(self, _request: web.BaseRequest) -> web.Response:
        count = self.replicas.count()
        return web.json_response(
            {"status": "ready" if count else "no replicas"}, status=200 if count else 503
        )

    async def handle_metrics(self, _request: web.BaseRequest) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def handle_state(self, _request: web.BaseRequest) -> web.Response:
        return web.json_response(
            {
                "model": self.config.model,
                "disaggregation": self.policy.disaggregation,
                "splitThresholdTokens": self.policy.split_threshold_tokens,
                "tokenCounting": self.counter.method,
                "replicas": self.replicas.snapshot(),
            }
        )

    async def handle_models(self, _request: web.BaseRequest) -> web.Response:
        assert self.client is not None
        tried: list[ReplicaState] = []
        for _ in range(2):
            replica = pick_single(self.replicas.by_role, monotonic(), tried)
            if replica is None:
                break
            tried.append(replica)
            try:
                async with asyncio.timeout(MODELS_TIMEOUT_SECONDS):
                    resp = await self.client.request(replica.address, "GET", "/v1/models", {})
                    try:
                        body = await resp.read()
                    finally:
                        resp.close()
                if resp.status == 200:
                    return web.Response(body=body, content_type="application/json")
            except (UpstreamError, TimeoutError) as exc:
                logger.debug("Replica %s did not list models: %s", replica.address, exc)
        card = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "tandem"}
        return web.json_response({"object": "list", "data": [card]})

    # ------------------------------------------------------------------------------ inference

    async def _handle(self, request: web.BaseRequest, path: str, *, chat: bool) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, f"The body exceeds {MAX_REQUEST_BYTES} bytes.", "invalid_request_error"
            )
        try:
            body = parse_json(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return error_response(400, "The body is not valid JSON.", "invalid_request_error")
        problem = request_problem(body, chat=chat)
        if problem is not None:
            return error_response(400, problem, "invalid_request_error")
        counter = self.counter
        tokens = counter.chat(body) if chat else counter.completion(body)
        metrics = self.metrics
        metrics.observe(metrics.prompt_tokens, tokens, counter.method)
        decision = decide(tokens, self.replicas.by_role, self.policy, monotonic())
        if decision is None:
            metrics.inc(metrics.requests, RoutePath.MIXED, "503")
            return error_response(
                503, f"No replica of {self.config.model} is available.", "service_unavailable"
            )
        metrics.inc(metrics.decisions, decision.path, decision.reason)
        ex = _Exchange(request, path, raw, body, tokens, chat)
        taken = [decision.path]
        code = CLIENT_CLOSED
        try:
            if decision.path is RoutePath.SPLIT:
                response = await self._split(ex, decision, taken)
            else:
                response = await self._single(ex, decision.target, ())
            code = str(response.status)
            return response
        finally:
            metrics.inc(metrics.requests, taken[-1], code)
            metrics.observe(metrics.e2e, perf_counter() - ex.start, taken[-1])

    def _acquire(self, replica: ReplicaState, tokens: int) -> None:
        self._seq += 1
        replica.last_pick = self._seq
        replica.inflight += 1
        replica.inflight_tokens += tokens
        self.metrics.inc(self.metrics.dispatched, replica.pool, replica.role)

    def _failed(self, replica: ReplicaState, failure: UpstreamFailure) -> None:
        replica.failed_until = monotonic() + FAILURE_COOLDOWN_SECONDS
        self.metrics.inc(self.metrics.upstream_errors, replica.role, failure.kind)
        logger.warning("Upstream %s replica %s failed: %s", replica.role, replica.address, failure)

    async def _single(
        self, ex: _Exchange, first: ReplicaState | None, exclude: tuple[ReplicaState, ...]
    ) -> web.StreamResponse:
        """The whole request on one replica; one retry on another."""
        tried = list(exclude)
        replica = first
        for attempt in range(2):
            if replica is None:
                break
            if attempt:
                self.metrics.inc(self.metrics.retries, "mixed")
            try:
                return await self._forward(ex, replica, ex.raw, ex.headers, RoutePath.MIXED)
            except UpstreamFailure as failure:
                self._failed(replica, failure)
                tried.append(replica)
                replica = pick_single(self.replicas.by_role, monotonic(), tried)
        return error_response(502, "Every replica tried failed; see the router's log.", "upstream_error")

    async def _split(self, ex: _Exchange, decision: Decision, taken: list[RoutePath]) -> web.StreamResponse:
        headers = ex.headers
        if "x-request-id" not in headers:
            headers["x-request-id"] = os.urandom(16).hex()  # uuid4().hex's shape, cheaper
        tried: list[ReplicaState] = []
        result = await self._prefill_step(ex, decision.prefill, tried)
        if isinstance(result, web.Response):
            return result  # the prefill replica rejected the request (4xx): the client's answer
        if result is _FAILED:
            return await self._fallback(ex, taken, tuple(tried))
        content = decode_content(ex, result)
        decode_tried: list[ReplicaState] = []
        decode: ReplicaState | None = decision.target
        for attempt in range(2):
            if decode is None:
                break
            if attempt:
                self.metrics.inc(self.metrics.retries, "decode")
            try:
                return await self._forward(ex, decode, content, headers, RoutePath.SPLIT)
            except UpstreamFailure as failure:
                self._failed(decode, failure)
                decode_tried.append(decode)
                decode = pick_replica(self.replicas.by_role["decode"], monotonic(), decode_tried)
        return await self._fallback(ex, taken, (*tried, *decode_tried))

    async def _prefill_step(
        self, ex: _Exchange, first: ReplicaState | None, tried: list[ReplicaState]
    ) -> Any:
        """The prefill on ``first``, then once on another prefill replica: the ``kv_transfer_params``
        (None if the replica gave none), a 4xx `web.Response`, or `_FAILED`."""
        body = {**ex.body, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV_PARAMS}
        body.pop("stream_options", None)
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        content = json.dumps(body).encode()
        replica = first
        for attempt in range(2):
            if replica is None:
                break
            if attempt:
                self.metrics.inc(self.metrics.retries, "prefill")
            try:
                return await self._prefill(ex, replica, content, ex.headers)
            except UpstreamFailure as failure:
                self._failed(replica, failure)
                tried.append(replica)
                replica = pick_replica(self.replicas.by_role["prefill"], monotonic(), tried, ex.tokens)
        return _FAILED

    async def _fallback(
        self, ex: _Exchange, taken: list[RoutePath], exclude: tuple[ReplicaState, ...]
    ) -> web.StreamResponse:
        """A split request whose prefill or decode failed everywhere: served whole by one replica."""
        self.metrics.inc(self.metrics.retries, "fallback")
        taken.append(RoutePath.MIXED)
        replica = pick_single(self.replicas.by_role, monotonic(), exclude)
        return await self._single(ex, replica, exclude)

    async def _prefill(
        self, ex: _Exchange, replica: ReplicaState, content: bytes, headers: dict[str, str]
    ) -> Any:
        """The prefill step: the returned ``kv_transfer_params`` (may be None), or the replica's
        4xx answer as a `web.Response`. Raises `UpstreamFailure`."""
        assert self.client is not None
        self._acquire(replica, ex.tokens)
        try:
            async with asyncio.timeout(self.config.timeouts.prefill_seconds):
                resp = await self.client.request(replica.address, "POST", ex.path, headers, content)
                try:
                    answer_bytes = await resp.read()
                finally:
                    resp.close()
        except TimeoutError:
            raise UpstreamFailure("timeout", "prefill did not answer in time") from None
        except UpstreamError as exc:
            raise UpstreamFailure("connect", f"prefill failed: {exc}") from None
        finally:
            replica.inflight -= 1
            replica.inflight_tokens -= ex.tokens
        status = resp.status
        content_type = resp.content_type or "application/json"
        if status >= 500:
            text = answer_bytes[:_MAX_ERROR_BODY].decode("utf-8", "replace")
            raise UpstreamFailure("status", f"prefill answered {status}: {text}")
        if status != 200:
            return _passthrough(status, answer_bytes, content_type)
        try:
            answer = parse_json(answer_bytes)
        except ValueError:
            raise UpstreamFailure("status", "prefill answered with a body that is not JSON") from None
        return answer.get("kv_transfer_params") if isinstance(answer, dict) else None

    async def _forward(
        self,
        ex: _Exchange,
        replica: ReplicaState,
        content: bytes,
        headers: dict[str, str],
        path: RoutePath,
    ) -> web.StreamResponse:
        """Send the request to ``replica`` and relay its answer (streamed or not) to the client.

        Raises `UpstreamFailure` only while nothing has been sent to the client."""
        assert self.client is not None
        weight = ex.tokens + ex.output_tokens()
        self._acquire(replica, weight)
        started: list[web.StreamResponse] = []  # the client response, once prepared
        try:
            async with asyncio.timeout(self.config.timeouts.decode_seconds):
                try:
                    resp = await self.client.request(replica.address, "POST", ex.path, headers, content)
                except UpstreamError as exc:
                    raise UpstreamFailure("connect", str(exc)) from None
                try:
                    return await self._relay(ex, replica, resp, path, started)
                finally:
                    # Closing an unfinished response drops its connection: the worker sees the
                    # disconnect and aborts the request (client gone, timeout, broken stream).
                    resp.close()
        except TimeoutError:
            if not started:
                raise UpstreamFailure("timeout", "no complete answer in time") from None
            self.metrics.inc(self.metrics.upstream_errors, replica.role, "timeout")
            await _end_stream(started[0], f"The {replica.role} replica did not finish in time.")
            return started[0]
        finally:
            replica.inflight -= 1
            replica.inflight_tokens -= weight

    async def _relay(
        self,
        ex: _Exchange,
        replica: ReplicaState,
        resp: Response,
        path: RoutePath,
        started: list[web.StreamResponse],
    ) -> web.StreamResponse:
        status = resp.status
        try:
            if status >= 500:
                text = (await resp.read())[:_MAX_ERROR_BODY].decode("utf-8", "replace")
                raise UpstreamFailure("status", f"answered {status}: {text}")
            if not ex.stream or status != 200:
                body = await resp.read()
                return _passthrough(status, body, resp.content_type or "application/json")
        except UpstreamError as exc:
            raise UpstreamFailure("connect", str(exc)) from None
        out = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await out.prepare(ex.request)
        started.append(out)
        metrics = self.metrics
        write = out.write
        try:
            chunks = resp.chunks()
            async for chunk in chunks:
                metrics.observe(metrics.ttft, perf_counter() - ex.start, path)
                await write(chunk)
                break
            async for chunk in chunks:
                await write(chunk)
        except UpstreamError as exc:
            # Past the point of retrying: tell the client in the stream, then end it.
            metrics.inc(metrics.upstream_errors, replica.role, "stream")
            logger.warning("Upstream %s replica %s broke a stream: %s", replica.role, replica.address, exc)
            await _end_stream(out, f"The upstream {replica.role} replica failed mid-stream.")
            return out
        except ConnectionError:  # the client went away; closing `resp` aborts the upstream request
            return out
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        return out


async def _end_stream(out: web.StreamResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await out.write(sse_error(message))
        await out.write_eof()


_decode_json = json.JSONDecoder().decode


def parse_json(raw: bytes) -> Any:
    """``json.loads(raw)``, minus its encoding detection for the usual body (UTF-8 text starting
    with ``{``, no BOM): the same result, a bit less work per request."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return _decode_json(raw.decode())
    return json.loads(raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prompt(prompt: Any) -> bool:
    """OpenAI's completion prompt: a string, a list of strings, of token ids, or of token-id lists."""
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt) or all(_is_int(p) for p in prompt):
        return True
    return all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)


def request_problem(body: Any, *, chat: bool) -> str | None:
    """Why ``body`` is not a request the router can route (a sentence for the client), or None.

    Only what routing reads is checked (shape and types); values are the worker's to judge."""
    if not isinstance(body, dict):
        return "The body must be a JSON object."
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of message objects."
        if not all(isinstance(m, dict) for m in messages):
            return "Each entry of 'messages' must be an object."
    elif not _is_prompt(body.get("prompt")):
        return "'prompt' must be a string, a list of strings, or a list of token ids."
    if "model" in body and not isinstance(body["model"], str):
        return "'model' must be a string."
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false."
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not _is_int(body[key]):
            return f"'{key}' must be an integer."
    return None


def decode_content(ex: _Exchange, kv_transfer_params: Any) -> bytes:
    """The decode step's body: the client's request plus the prefill's ``kv_transfer_params``.

    The client's bytes are reused when they can be (no ``kv_transfer_params`` of their own, a plain
    UTF-8 object): the field is appended before the closing brace instead of serialising the whole
    request (prompt included) once more."""
    if kv_transfer_params is None:
        return ex.raw
    raw = ex.raw
    if raw[:1] != b"{" or raw[-1:] != b"}":
        raw = raw.strip()
    if ex.body and "kv_transfer_params" not in ex.body and raw[:1] == b"{" and raw[-1:] == b"}":
        params = json.dumps(kv_transfer_params).encode()
        return b"".join((memoryview(raw)[:-1], b', "kv_transfer_params": ', params, b"}"))  # one copy
    return json.dumps({**ex.body, "kv_transfer_params": kv_transfer_params}).encode()


def _request_factory(loop: asyncio.AbstractEventLoop) -> RequestFactory:
    """aiohttp's `web.BaseRequest` with the router's body limit (the default is 1 MiB)."""

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=MAX_REQUEST_BYTES
        )

    return make


def _status_response(status: int, allow: str | None = None) -> web.Response:
    """aiohttp's own 404 / 405 answers (plain text; 405 with ``Allow``)."""
    reason = "Not Found" if status == 404 else "Method Not Allowed"
    headers = {"Allow": allow} if allow else None
    return web.Response(status=status, text=f"{status}: {reason}", headers=headers)


def _passthrough(status: int, content: bytes, content_type: str) -> web.Response:
    return web.Response(status=status, body=content, headers={"Content-Type": content_type})


def build_router(config_path: str | Path, *, reload_seconds: float = DEFAULT_RELOAD_SECONDS) -> Router:
    """A router configured from the file at ``config_path``, reloading it every ``reload_seconds``."""
    return Router(load_config(config_path), config_path=config_path, reload_seconds=reload_seconds)
