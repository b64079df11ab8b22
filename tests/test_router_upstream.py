"""The router's upstream HTTP/1.1 client (`tandem.router.upstream`) against scripted raw servers:
body framing, keep-alive reuse, a replica closing an idle connection, aborting unread answers; and
the decode body built from the client's bytes (`tandem.router.server.decode_content`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import make_mocked_request

from tandem.router.server import _Exchange, decode_content
from tandem.router.upstream import UpstreamClient, UpstreamError, split_address

pytestmark = pytest.mark.timeout(30)

Answer = Callable[[bytes], bytes]  # request bytes -> answer bytes


class RawServer:
    """Answers each request (head plus Content-Length body) with ``answer``; counts connections.
    ``close_after_answer``: close the connection once the answer is written."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.close_after_answer = False
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                writer.write(self.answer(request))
                await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    def drop(self) -> None:
        """Close every open connection (a replica's keep-alive timeout)."""
        for writer in self.writers:
            writer.close()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


Serve = Callable[[Answer], Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawServer] = []

    async def start(answer: Answer) -> RawServer:
        s = RawServer(answer)
        s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()


def fixed(answer: bytes) -> Answer:
    return lambda _request: answer


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_keep_alive_reuses_one_connection_and_sends_a_clean_head(serve: Serve) -> None:
    server = await serve(fixed(OK))
    client = UpstreamClient(1.0)
    for _ in range(3):
        resp = await client.request(server.address, "POST", "/v1/completions", {"x-request-id": "r"}, b"{}")
        assert (resp.status, resp.content_type, await resp.read()) == (200, "application/json", b"{}")
        resp.close()
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "POST /v1/completions HTTP/1.1"
    assert sorted(head[1:]) == sorted([f"Host: {server.address}", "Content-Length: 2", "x-request-id: r"])
    client.close()


async def test_chunked_answers_stream_without_framing(serve: Serve) -> None:
    body = b"5\r\ndata:\r\n6;ext=1\r\n one\n\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    server = await serve(fixed(CHUNKED + body))
    client = UpstreamClient(1.0)
    resp = await client.request(server.address, "POST", "/", {}, b"{}")
    assert resp.content_type == "text/event-stream"
    assert [chunk async for chunk in resp.chunks()] == [b"data:", b" one\n\n"]
    resp = await client.request(server.address, "POST", "/", {}, b"{}")
    assert await resp.read() == b"data: one\n\n"
    assert server.connections == 1  # read to the end: the connection was kept
    client.close()


async def test_an_answer_up_to_the_connections_end(serve: Serve) -> None:
    server = await serve(fixed(b"HTTP/1.0 200 OK\r\n\r\nall of it"))
    server.close_after_answer = True
    client = UpstreamClient(1.0)
    for _ in range(2):
        resp = await client.request(server.address, "POST", "/", {}, b"{}")
        assert await resp.read() == b"all of it"
    assert server.connections == 2  # never kept
    client.close()


async def test_a_stream_cut_short_raises_upstream_error(serve: Serve) -> None:
    server = await serve(fixed(CHUNKED + b"5\r\nhello\r\n"))
    server.close_after_answer = True
    client = UpstreamClient(1.0)
    resp = await client.request(server.address, "POST", "/", {}, b"{}")
    got: list[bytes] = []
    with pytest.raises(UpstreamError):
        async for chunk in resp.chunks():
            got.append(chunk)
    assert got == [b"hello"]
    client.close()


async def test_closing_an_unread_answer_closes_its_connection(serve: Serve) -> None:
    server = await serve(fixed(CHUNKED + b"5\r\nhello\r\n"))  # and then nothing: a long stream
    client = UpstreamClient(1.0)
    resp = await client.request(server.address, "POST", "/", {}, b"{}")
    assert await resp.chunks().__anext__() == b"hello"
    resp.close()  # the client went away: the replica must see the disconnect
    await asyncio.wait_for(server.closed.wait(), 5)
    assert not any(client._idle.values())
    client.close()


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "racing"])
async def test_a_replica_closing_an_idle_connection_costs_no_failure(serve: Serve, noticed: bool) -> None:
    server = await serve(fixed(OK))
    client = UpstreamClient(1.0)
    assert await (await client.request(server.address, "POST", "/", {}, b"{}")).read() == b"{}"
    server.drop()  # the replica's keep-alive timeout
    if noticed:
        await asyncio.sleep(0.05)  # the client sees the close before the next request
    resp = await client.request(server.address, "POST", "/", {}, b"{}")
    assert (resp.status, await resp.read()) == (200, b"{}")
    assert server.connections == 2
    client.close()


async def test_connect_failures_and_malformed_answers_raise_upstream_error(serve: Serve) -> None:
    client = UpstreamClient(1.0)
    server = await serve(fixed(b"NOT HTTP\r\n\r\n"))
    address = server.address
    with pytest.raises(UpstreamError):
        await client.request(address, "POST", "/", {}, b"{}")
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()
    with pytest.raises(UpstreamError):  # refused
        await client.request(address, "POST", "/", {}, b"{}")
    client.close()


def test_addresses_split_into_host_and_port() -> None:
    assert split_address("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert split_address("[fd00::1]:8000") == ("fd00::1", 8000)


def exchange(raw: bytes) -> _Exchange:
    request = make_mocked_request("POST", "/v1/completions", headers={})
    return _Exchange(request, "/v1/completions", raw, json.loads(raw), 10, chat=False)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "hi", "max_tokens": 4}',
        b'  {"prompt": "h\\u00e9", "stream": true}\n',
        b'{"prompt": "hi", "kv_transfer_params": {"old": 1}}',
        '\ufeff{"prompt": "hi"}'.encode(),
    ],
)
def test_the_decode_body_is_the_request_plus_the_prefills_kv_params(raw: bytes) -> None:
    ex = exchange(raw)
    kv = {"remote_block_ids": [1, 2], "remote_engine_id": "p"}
    assert json.loads(decode_content(ex, kv)) == {**json.loads(raw), "kv_transfer_params": kv}
    assert decode_content(ex, None) == raw
