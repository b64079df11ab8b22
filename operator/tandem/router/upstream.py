"""The router's upstream HTTP/1.1 client: keep-alive connections to the replicas, as little work per
request as the proxy needs.

Profiling the router (``make bench-router``) showed a general-purpose client's per-request work
(request and response objects, cookie handling, header multidicts, timers) at a third to a half of the
router's CPU time. The proxy needs much less: write one request it already holds
as bytes, read the status and framing of the answer, hand over the body whole or piece by piece.

* Connections are kept per replica address and reused (most recently used first); one idle longer
  than `IDLE_SECONDS`, or closed by the replica, is dropped. A request whose reused connection turns
  out closed before any byte of the answer came is sent once more on a new connection (the replica
  closed an idle connection just as it was picked: the request was never read).
* The answer's body framing follows RFC 9112 section 6.3: no body (1xx, 204, 304), chunked,
  ``Content-Length``, else up to the connection's end. A connection goes back to the pool only once
  its answer was read to the end and neither side asked to close it.
* `Response.close` on an answer not read to the end closes the connection: the replica sees the
  disconnect and aborts the request (client gone, timeout).
* Failures (connect, reset, an answer cut short, a malformed answer) raise `UpstreamError`, never an
  `OSError`, so that the caller can tell them from its own client going away.

Time limits: the connect by ``connect_seconds``; everything else by the caller's ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

IDLE_SECONDS = 30.0
SWEEP_SECONDS = 10.0
MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
MAX_ADDRESSES = 4096

monotonic = time.monotonic


class UpstreamError(Exception):
    """The upstream call failed (connection, reset, truncated or malformed answer)."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class _Connection:
    __slots__ = ("idle_since", "reader", "reused", "target", "writer")

    def __init__(
        self, target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.target = target
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def usable(self, now: float) -> bool:
        return (
            now - self.idle_since < IDLE_SECONDS
            and not self.reader.at_eof()
            and not self.writer.transport.is_closing()
        )

    def close(self) -> None:
        self.writer.transport.abort()  # no lingering: the replica must see the request go


class Response:
    """One upstream answer: ``status``, ``content_type`` and the body via `read` or `chunks`."""

    __slots__ = ("_chunked", "_client", "_conn", "_done", "_keep", "_remaining", "content_type", "status")

    def __init__(
        self,
        client: UpstreamClient,
        conn: _Connection,
        status: int,
        content_type: str | None,
        length: int | None,
        chunked: bool,
        keep: bool,
    ) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = status
        self.content_type = content_type
        self._remaining = length  # None: chunked or up to the connection's end
        self._chunked = chunked
        self._keep = keep and (chunked or length is not None)
        self._done = length == 0 and not chunked
        if self._done:
            self._finish()

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        if self._done:
            return b""
        if self._remaining is not None and not self._chunked:
            conn = self._conn
            assert conn is not None
            try:
                data = await conn.reader.readexactly(self._remaining)
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise UpstreamError(f"the answer ended early: {_describe(exc)}") from None
            self._remaining = 0
            self._finish()
            return data
        return b"".join([piece async for piece in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives (chunked framing removed); raises `UpstreamError`
        when it ends early."""
        conn = self._conn
        if self._done or conn is None:
            return
        reader = conn.reader
        try:
            if self._chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                            pass
                        break
                    data = await reader.readexactly(size)
                    if await reader.readexactly(2) != b"\r\n":
                        raise UpstreamError("malformed chunked body")
                    yield data
            elif self._remaining is not None:
                while self._remaining > 0:
                    data = await reader.read(min(self._remaining, READ_SIZE))
                    if not data:
                        raise UpstreamError("the answer ended early")
                    self._remaining -= len(data)
                    yield data
            else:
                while data := await reader.read(READ_SIZE):
                    yield data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise UpstreamError(f"the answer ended early: {_describe(exc)}") from None
        self._finish()

    def _finish(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._keep:
                self._client.release(conn)
            else:
                conn.close()

    def close(self) -> None:
        """Done with the answer: a connection whose answer was not read to the end is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class UpstreamClient:
    def __init__(self, connect_seconds: float) -> None:
        self.connect_seconds = connect_seconds
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._next_sweep = monotonic() + SWEEP_SECONDS

    async def request(
        self,
        address: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
    ) -> Response:
        """Send the request to ``address`` (``host:port``); the answer once its head arrived."""
        target = self._addresses.get(address)
        if target is None:
            if len(self._addresses) >= MAX_ADDRESSES:  # replicas come and go: keep it bounded
                self._addresses.clear()
            target = self._addresses[address] = split_address(address)
        head = _request_head(method, path, address, headers, len(body))
        payload = head + body if len(body) < 16384 else None
        while True:
            conn = self._acquire(target) or await self._connect(target)
            try:
                if payload is not None:
                    conn.writer.write(payload)
                else:
                    conn.writer.writelines((head, body))
                return await self._read_head(conn)
            except (OSError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if conn.reused and _closed_before_answer(exc):
                    continue  # the replica closed the idle connection as it was picked: never read
                raise UpstreamError(_describe(exc)) from None
            except (asyncio.LimitOverrunError, ValueError, IndexError) as exc:
                conn.close()
                raise UpstreamError(f"malformed answer: {_describe(exc)}") from None
            except BaseException:  # cancelled (client gone, timeout): the replica must see it
                conn.close()
                raise

    def _acquire(self, target: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(target)
        if idle:
            now = monotonic()
            while idle:
                conn = idle.pop()
                if conn.usable(now):
                    conn.reused = True
                    return conn
                conn.close()
        return None

    async def _connect(self, target: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_seconds):
                reader, writer = await asyncio.open_connection(target[0], target[1], limit=MAX_HEAD_BYTES)
        except TimeoutError:
            raise UpstreamError(f"connect to {target[0]}:{target[1]} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"connect to {target[0]}:{target[1]} failed: {_describe(exc)}") from None
        return _Connection(target, reader, writer)

    async def _read_head(self, conn: _Connection) -> Response:
        while True:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
            lines = raw[:-4].decode("latin-1").split("\r\n")
            version, status_text = lines[0].split(" ", 2)[:2]
            status = int(status_text)
            if not 100 <= status < 200:
                break
        content_type, length, chunked, keep = _framing(lines, keep=version == "HTTP/1.1")
        if status in (204, 304):
            length, chunked = 0, False
        return Response(self, conn, status, content_type, length, chunked, keep)

    def release(self, conn: _Connection) -> None:
        """A connection whose answer was read to the end, back to its pool."""
        now = monotonic()
        conn.idle_since = now
        idle = self._idle.get(conn.target)
        if idle is None:
            idle = self._idle[conn.target] = []
        idle.append(conn)
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close idle connections that expired or whose replica closed them."""
        self._next_sweep = now + SWEEP_SECONDS
        for key, idle in list(self._idle.items()):
            keep = [conn for conn in idle if conn.usable(now)]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(method: str, path: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    if length or method == "POST":
        lines.append(f"Content-Length: {length}\r\n")
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            continue  # never a header injection; the server edge rejects these anyway
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _framing(lines: list[str], *, keep: bool) -> tuple[str | None, int | None, bool, bool]:
    """From an answer's header lines: Content-Type, Content-Length (None: chunked or up to the
    connection's end), chunked, and whether the connection may be kept."""
    content_type: str | None = None
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative Content-Length")
        elif name == "content-type":
            content_type = value.strip()
        elif name == "transfer-encoding":
            chunked = value.strip().lower().endswith("chunked")
        elif name == "connection":
            tokens = value.lower()
            keep = "close" not in tokens and (keep or "keep-alive" in tokens)
    return content_type, None if chunked else length, chunked, keep


def _closed_before_answer(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.IncompleteReadError):
        return not exc.partial
    return isinstance(exc, ConnectionResetError | BrokenPipeError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
