"""A bounded open-loop load generator: ``/v1/completions`` through the router at fixed rates.

Phases run one after the other (rate, prompt length, output length, duration); the whole run
stops by itself after the last phase (or at ``stop()``), and never has more than
``max_in_flight`` requests outstanding (arrivals beyond it are counted as dropped, and as SLO
misses in the report, so an
overloaded service cannot make the generator grow without bound). Arrivals are evenly spaced,
so two runs send the same requests.

Requests stream (``stream: true``), as chat clients do, so the router's histogram of first
tokens as clients see them fills (the planner's error budget reads it). A request meets the
SLO when its stream ends with ``[DONE]`` within ``ttft + max_tokens * itl`` (the first token
and every later one within their targets at worst); ``Sample.ttft`` is its first chunk.
Prompts are filler text of ``4 * tokens`` bytes: the router and the simulated worker count
``ceil(bytes / 4)`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float  # requests per second
    prompt_tokens: int
    max_tokens: int
    seconds: float


@dataclass(frozen=True)
class Sample:
    phase: str
    sent: float  # monotonic time
    latency: float
    ok: bool
    within_slo: bool
    ttft: float | None = None  # seconds to the first chunk of the stream


@dataclass
class LoadReport:
    samples: list[Sample] = field(default_factory=list)
    dropped: int = 0

    def window(self, start: float, end: float | None = None, phase: str | None = None) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.sent >= start and (end is None or s.sent < end) and (phase is None or s.phase == phase)
        ]

    @staticmethod
    def attainment(samples: list[Sample]) -> float | None:
        return sum(s.within_slo for s in samples) / len(samples) if samples else None


def prompt_text(tokens: int) -> str:
    word = "tandem "  # 7 bytes; padded to exactly 4 * tokens bytes
    text = (word * (4 * tokens // len(word) + 1))[: 4 * tokens]
    return text


class LoadGenerator:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        ttft_s: float,
        itl_s: float,
        max_in_flight: int = 64,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.report = LoadReport()
        self._in_flight: dict[object, float] = {}  # one entry per request awaiting its answer
        self.phase: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, phases: list[Phase]) -> LoadGenerator:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(phases)), daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stops sending and waits (bounded) for the requests in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def _run(self, phases: list[Phase]) -> None:
        limits = aiohttp.TCPConnector(limit=self.max_in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=limits, timeout=timeout) as session:
            for phase in phases:
                if self._stop.is_set():
                    break
                self.phase = phase.name
                body = {
                    "model": self.model,
                    "prompt": prompt_text(phase.prompt_tokens),
                    "max_tokens": phase.max_tokens,
                    "stream": True,
                }
                slo = self.ttft_s + phase.max_tokens * self.itl_s
                start = time.monotonic()
                n = 0
                while not self._stop.is_set():
                    due = start + n / phase.rate
                    if due >= start + phase.seconds:
                        break
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    n += 1
                    if len(tasks) >= self.max_in_flight:
                        # not sent: the client gave up, so it counts against the SLO
                        self.report.dropped += 1
                        self.report.samples.append(Sample(phase.name, time.monotonic(), 0.0, False, False))
                        continue
                    task = asyncio.create_task(self._one(session, phase.name, body, slo))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            self.phase = None
            if tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait(tasks, timeout=self.timeout_s)

    async def _one(
        self, session: aiohttp.ClientSession, phase: str, body: dict[str, object], slo: float
    ) -> None:
        sent = time.monotonic()
        key = object()
        self._in_flight[key] = sent
        ok = False
        first: float | None = None
        try:
            async with session.post(self.url, json=body) as resp:
                tail = b""
                async for chunk in resp.content.iter_any():
                    if first is None and chunk:
                        first = time.monotonic() - sent
                    tail = (tail + chunk)[-64:]
                # a stream that broke ends with an error event, not [DONE]
                ok = resp.status == 200 and b"data: [DONE]" in tail
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        latency = time.monotonic() - sent
        self.report.samples.append(Sample(phase, sent, latency, ok, ok and latency <= slo, first))
        self._in_flight.pop(key, None)

    def in_flight_sent_before(self, t: float) -> int:
        """Requests sent before monotonic time ``t`` still waiting for their answer."""
        return sum(1 for sent in list(self._in_flight.values()) if sent < t)
