"""The router's edge against hostile or broken clients, over real loopback HTTP.

An upstream "worker" here is a small aiohttp app that records every request it receives and answers
with headers a proxy must not relay (hop-by-hop, cookies). The router must:

* reject malformed requests (not JSON, not an object, wrong field types, oversized bodies and
  headers, request-smuggling framing) with a 4xx and an OpenAI-style error, without calling any
  replica;
* forward only the end-to-end headers it means to (``Authorization`` for the workers' ``--api-key``,
  ``X-Request-Id``, trace context), never hop-by-hop headers (RFC 9110 section 7.6.1, including
  those the client names in ``Connection``), ``Proxy-Authorization``, ``Cookie`` or the client's
  ``Host``;
* relay none of the upstream's hop-by-hop or cookie headers back to the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tandem.router.config import parse_config
from tandem.router.main import start_router
from tandem.router.server import MAX_REQUEST_BYTES, Router

pytestmark = pytest.mark.timeout(60)

MODEL = "llama-3.1-8b"
ANSWER = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "hi"}]}
# Headers an upstream might send that a proxy must never relay to its client.
UPSTREAM_LEAKS = {
    "Set-Cookie": "session=upstream-secret",
    "Keep-Alive": "timeout=5",
    "Proxy-Authenticate": "Basic realm=upstream",
    "X-Upstream-Internal": "10.0.0.7",
}


@dataclass
class Recorder:
    """A fake replica that records the requests it receives (method, path, headers, body)."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.headers), body))
        if json.loads(body).get("stream"):
            out = web.StreamResponse(
                status=200, headers={"Content-Type": "text/event-stream", **UPSTREAM_LEAKS}
            )
            await out.prepare(request)
            await out.write(b'data: {"choices": [{"text": "hi"}]}\n\n')
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        return web.json_response(ANSWER, headers=UPSTREAM_LEAKS)


@dataclass
class Edge:
    session: aiohttp.ClientSession
    recorder: Recorder
    router: Router
    url: str
    port: int

    async def post(self, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.post(self.url + "/v1/completions", data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def raw(self, request: bytes) -> bytes:
        """Sends ``request`` verbatim on a fresh connection; returns what came back."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            return await asyncio.wait_for(reader.read(65536), 10)
        finally:
            writer.close()


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    recorder = Recorder()
    app = web.Application(client_max_size=2 * MAX_REQUEST_BYTES)
    app.router.add_post("/v1/completions", recorder.handle)
    app.router.add_post("/v1/chat/completions", recorder.handle)
    upstream = web.AppRunner(app, access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", 0).start()
    address = f"127.0.0.1:{upstream.addresses[0][1]}"
    config = parse_config(
        {"model": MODEL, "pools": [{"name": "mixed", "role": "mixed", "endpoints": [address]}]}
    )
    router = Router(config)
    runner, port = await start_router(router, "127.0.0.1", 0)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield Edge(session, recorder, router, f"http://127.0.0.1:{port}", port)
    finally:
        await session.close()
        await runner.cleanup()
        await upstream.cleanup()


def openai_error(body: Any) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"]["type"] == "invalid_request_error", body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


MALFORMED: list[tuple[str, bytes]] = [
    ("empty body", b""),
    ("not JSON", b"{nope"),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}'),
    ("JSON array", b"[1, 2]"),
    ("JSON string", b'"prompt"'),
    ("JSON null", b"null"),
    ("no prompt", b'{"model": "llama-3.1-8b"}'),
    ("prompt is a number", b'{"prompt": 5}'),
    ("prompt is an object", b'{"prompt": {"text": "hi"}}'),
    ("prompt list of mixed types", b'{"prompt": ["a", 1]}'),
    ("model is a number", b'{"prompt": "hi", "model": 7}'),
    ("stream is a string", b'{"prompt": "hi", "stream": "yes"}'),
    ("max_tokens is a string", b'{"prompt": "hi", "max_tokens": "10"}'),
    ("max_tokens is a bool", b'{"prompt": "hi", "max_tokens": true}'),
    ("nesting bomb", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]

MALFORMED_CHAT: list[tuple[str, bytes]] = [
    ("no messages", b'{"model": "llama-3.1-8b"}'),
    ("messages is a string", b'{"messages": "hi"}'),
    ("message is not an object", b'{"messages": ["hi"]}'),
    (
        "max_completion_tokens is a float",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1.5}',
    ),
]


@pytest.mark.parametrize(("case", "data"), MALFORMED, ids=[c for c, _ in MALFORMED])
async def test_malformed_completions_are_rejected_before_any_replica(
    edge: Edge, case: str, data: bytes
) -> None:
    status, body = await edge.post(data, {"Content-Type": "application/json"})
    assert status == 400, (case, body)
    openai_error(body)
    assert edge.recorder.requests == []


@pytest.mark.parametrize(("case", "data"), MALFORMED_CHAT, ids=[c for c, _ in MALFORMED_CHAT])
async def test_malformed_chat_requests_are_rejected_before_any_replica(
    edge: Edge, case: str, data: bytes
) -> None:
    async with edge.session.post(edge.url + "/v1/chat/completions", data=data) as resp:
        status, body = resp.status, await resp.json()
    assert status == 400, (case, body)
    openai_error(body)
    assert edge.recorder.requests == []


async def test_well_formed_requests_still_pass(edge: Edge) -> None:
    for body in (
        {"prompt": "hi"},
        {"prompt": ["a", "b"]},
        {"prompt": [1, 2, 3]},
        {"prompt": [[1, 2], [3]]},
        {"prompt": "hi", "model": MODEL, "stream": False, "max_tokens": 8},
    ):
        status, answer = await edge.post(json.dumps(body).encode())
        assert (status, answer) == (200, ANSWER), body
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    async with edge.session.post(edge.url + "/v1/chat/completions", json=chat) as resp:
        assert resp.status == 200
    assert len(edge.recorder.requests) == 6


async def test_oversized_body_is_rejected_with_413(edge: Edge) -> None:
    big = json.dumps({"prompt": "x" * (MAX_REQUEST_BYTES + 1)}).encode()
    status, body = await edge.post(big)
    assert status == 413
    assert body["error"]["type"] == "invalid_request_error"
    assert str(MAX_REQUEST_BYTES) in body["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    async with edge.session.post(edge.url + "/v1/completions", data=chunks()) as resp:
        assert resp.status == 413
    assert edge.recorder.requests == []
    # just under the limit is served
    fits = json.dumps({"prompt": "x" * (MAX_REQUEST_BYTES - 64)}).encode()
    assert (await edge.post(fits))[0] == 200


async def test_oversized_headers_and_smuggling_framing_get_4xx(edge: Edge) -> None:
    huge = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + b"a" * 100_000 + b"\r\n"
    huge += b'Content-Length: 15\r\n\r\n{"prompt":"hi"}'
    assert (await edge.raw(huge)).split(b" ")[1].startswith(b"4")
    body = b'{"prompt":"hi"}'
    smuggle = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body
    )
    assert (await edge.raw(smuggle)).split(b" ")[1].startswith(b"4")
    bad_length = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + body
    assert (await edge.raw(bad_length)).split(b" ")[1].startswith(b"4")
    assert edge.recorder.requests == []


async def test_unknown_paths_and_methods_are_4xx(edge: Edge) -> None:
    async with edge.session.get(edge.url + "/v1/completions") as resp:
        assert resp.status == 405
    async with edge.session.post(edge.url + "/v1/embeddings", json={"input": "x"}) as resp:
        assert resp.status == 404
    async with edge.session.post(edge.url + "/../../etc/passwd", data=b"{}") as resp:
        assert resp.status == 404
    assert edge.recorder.requests == []


async def test_only_end_to_end_headers_reach_the_replica(edge: Edge) -> None:
    headers = {
        "Authorization": "Bearer client-key",
        "X-Request-Id": "req-1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Cookie": "session=client-secret",
        "Connection": "keep-alive, X-Hop-Custom",
        "Keep-Alive": "timeout=100",
        "X-Hop-Custom": "must-not-pass",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "websocket",
        "Proxy-Connection": "keep-alive",
        "Host": "evil.example",
        "X-Forwarded-For": "6.6.6.6",
        "Content-Type": "text/plain",
    }
    status, _ = await edge.post(b'{"prompt": "hi"}', headers)
    assert status == 200
    [(_, path, seen, body)] = edge.recorder.requests
    assert path == "/v1/completions" and json.loads(body) == {"prompt": "hi"}
    seen_lower = {k.lower(): v for k, v in seen.items()}
    assert seen_lower["authorization"] == "Bearer client-key"
    assert seen_lower["x-request-id"] == "req-1"
    assert seen_lower["traceparent"].startswith("00-0af7")
    assert seen_lower["content-type"] == "application/json"
    for name in (
        "proxy-authorization",
        "cookie",
        "keep-alive",
        "x-hop-custom",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "x-forwarded-for",
    ):
        assert name not in seen_lower, name
    assert seen_lower.get("host", "").startswith("127.0.0.1:")
    assert "upgrade" not in seen_lower.get("connection", "").lower()


async def test_a_header_named_in_connection_is_not_forwarded_even_if_allowed(edge: Edge) -> None:
    """RFC 9110 7.6.1: a field the client lists in Connection is hop-by-hop, whatever its name."""
    headers = {"Authorization": "Bearer k", "X-Request-Id": "r", "Connection": "Authorization, X-Request-Id"}
    assert (await edge.post(b'{"prompt": "hi"}', headers))[0] == 200
    [(_, _, seen, _)] = edge.recorder.requests
    seen_lower = {k.lower() for k in seen}
    assert "authorization" not in seen_lower and "x-request-id" not in seen_lower


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_upstream_hop_by_hop_and_cookie_headers_are_not_relayed(edge: Edge, stream: bool) -> None:
    async with edge.session.post(
        edge.url + "/v1/completions", json={"prompt": "hi", "stream": stream}
    ) as resp:
        assert resp.status == 200
        await resp.read()
        got = {k.lower() for k in resp.headers}
    for name in UPSTREAM_LEAKS:
        assert name.lower() not in got, name
