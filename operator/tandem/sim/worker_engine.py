"""The simulated worker's engine: iteration-level continuous batching, as vLLM's V1 scheduler does it.

The engine knows nothing about HTTP or Prometheus. It owns a queue of waiting requests, a running batch, a
pool of KV-cache blocks and a model clock, and it runs one loop:

1. **schedule** (pure bookkeeping, no awaits): running requests first, in admission order, each gets the
   tokens it still needs (1 for a decoding request, a chunk of the prompt for a prefilling one) within the
   iteration's token budget; a running request that cannot get a KV block preempts the most recently
   admitted one (vLLM's recompute preemption); then waiting requests are admitted first-come-first-served
   while there are sequence slots, budget and free blocks (head-of-line blocking, as in vLLM).
2. **time** the iteration with a `TimingModel` (the performance model): the prefill chunks and the decode
   batch of one iteration run in the same forward pass, so every decode token of an iteration that also
   carries prefill work waits for the whole iteration (the prefill/decode interference of a mixed worker:
   its inter-token latency jumps whenever a prompt is being prefilled).
3. **sleep** ``iteration_seconds * time_scale`` of wall time, then **complete** the iteration: advance
   progress, emit tokens to the requests' streams, finish requests, report to the `EngineObserver`.

Token bookkeeping follows vLLM: a request has ``num_tokens`` known tokens (prompt + generated) and
``num_computed`` tokens whose KV exists; an iteration computes ``num_tokens - num_computed`` of them (capped
by the budget) and, once they are all computed, samples one new token. Decode is the case where one token
is missing. Preemption resets ``num_computed`` to 0, so the request recomputes prompt and output.

Disaggregation (vLLM's NIXL connector protocol, pull mode):

* a request with ``kv_transfer_params.do_remote_decode`` runs normally; when it finishes, its prompt blocks
  stay allocated for the decode side to read (``kv_hold_seconds``, the modelled transfer time; vLLM holds
  them until the decode side's notification or a lease timeout) and the request carries the parameters
  the decode side needs (`build_remote_prefill_params`);
* a request with ``do_remote_prefill`` and remote blocks gets blocks for its whole prompt when admitted,
  then waits (counted as *waiting*, like vLLM's ``WAITING_FOR_REMOTE_KVS``) while a `KvFetcher` pulls the
  KV. The last prompt token is then recomputed locally, which yields the first output token (vLLM does the
  same to get logits). If the fetch fails the request falls back to a local prefill.

Time: all timestamps and durations the engine reports are *model* seconds (`ModelClock`): wall seconds
divided by ``time_scale``, except that the clock is frozen between back-to-back iterations, so event-loop
overhead does not leak into the modelled latencies while the engine is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# vLLM's default KV block size on GPUs (tokens per block).
DEFAULT_BLOCK_SIZE = 16
# vLLM's finish reasons (vllm/v1/engine FINISH_REASON_STRINGS); all are exported at 0 from the start.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class Role(enum.StrEnum):
    """What the worker is deployed as. Every role serves every request (vLLM's NIXL connector is
    ``kv_both``); the role says which requests the router is expected to send."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


class KvMode(enum.Enum):
    LOCAL = "local"  # an ordinary request: prefill and decode here
    REMOTE_DECODE = "remote_decode"  # prefill here, a decode worker pulls the KV afterwards
    REMOTE_PREFILL = "remote_prefill"  # the prompt's KV is pulled from a prefill worker


class State(enum.Enum):
    WAITING = "waiting"
    FETCHING = "fetching"  # blocks allocated, KV being pulled from the prefill worker
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class PrefillChunk:
    """``tokens`` new prompt tokens of one request, after ``cached`` tokens whose KV already exists."""

    tokens: int
    cached: int = 0


class TimingModel(Protocol):
    """Model seconds for the engine's work. `tandem.sim.worker.PerfTimingModel` binds the performance
    model (`tandem.perf.model`) to one accelerator, model and TP degree."""

    def iteration_seconds(self, prefill: Sequence[PrefillChunk], decode_context: Sequence[int]) -> float:
        """One forward pass over some prefill chunks and a decode batch (one token per sequence,
        ``decode_context`` holds each sequence's context length including that token)."""
        ...

    def kv_transfer_seconds(self, tokens: int) -> float: ...


@dataclass(frozen=True)
class KvFetch:
    """One pull of a prompt's KV from a prefill worker."""

    request_id: str
    params: Mapping[str, Any]  # the kv_transfer_params the decode request carried
    num_tokens: int  # tokens whose KV is pulled
    local_block_ids: tuple[int, ...]


class KvFetcher(Protocol):
    """Moves a prompt's KV from the prefill worker into this worker's blocks.

    Returns when the KV is in place; raises to make the engine fall back to a local prefill. The default
    (`ModelledKvFetcher`) only waits for the modelled transfer time; a NIXL sidecar can implement the same
    protocol and move real bytes.
    """

    async def fetch(self, fetch: KvFetch) -> None: ...


class ModelledKvFetcher:
    """A `KvFetcher` that moves nothing and takes the performance model's transfer time."""

    def __init__(self, timing: TimingModel, time_scale: float) -> None:
        self._timing = timing
        self._time_scale = time_scale

    async def fetch(self, fetch: KvFetch) -> None:
        await asyncio.sleep(self._timing.kv_transfer_seconds(fetch.num_tokens) * self._time_scale)


class EngineObserver(Protocol):
    """What the engine reports; `tandem.sim.worker_metrics.WorkerMetrics` turns it into vLLM's metrics.
    All durations are model seconds."""

    def on_scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None: ...

    def on_iteration(self, num_tokens: int, num_preemptions: int) -> None: ...

    def on_first_token(self, ttft: float, prompt_tokens: int) -> None: ...

    def on_tokens(self, num_generated: int, inter_token_latencies: Sequence[float]) -> None: ...

    def on_finished(self, request: SimRequest) -> None: ...

    def on_kv_fetch(self, ok: bool) -> None: ...


class NullObserver:
    def on_scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None:
        pass

    def on_iteration(self, num_tokens: int, num_preemptions: int) -> None:
        pass

    def on_first_token(self, ttft: float, prompt_tokens: int) -> None:
        pass

    def on_tokens(self, num_generated: int, inter_token_latencies: Sequence[float]) -> None:
        pass

    def on_finished(self, request: SimRequest) -> None:
        pass

    def on_kv_fetch(self, ok: bool) -> None:
        pass


class ModelClock:
    """Model time: wall time divided by ``time_scale`` while idle; while busy, exactly the sum of the
    modelled iteration times (interpolated within an iteration, frozen between iterations)."""

    def __init__(self, time_scale: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale
        self._monotonic = monotonic
        self._base_model = 0.0
        self._base_wall = monotonic()
        self._cap: float | None = None  # None: follows the wall clock; else at most this far past the base

    def now(self) -> float:
        elapsed = (self._monotonic() - self._base_wall) / self.time_scale
        if self._cap is not None:
            elapsed = min(elapsed, self._cap)
        return self._base_model + elapsed

    def begin_iteration(self, seconds: float) -> None:
        self._rebase(cap=seconds)

    def end_iteration(self) -> None:
        """Jump to the end of the current iteration and hold there until the next one begins."""
        self._base_model += self._cap or 0.0
        self._base_wall = self._monotonic()
        self._cap = 0.0

    def release(self) -> None:
        """The engine went idle: follow the wall clock again."""
        self._rebase(cap=None)

    def _rebase(self, cap: float | None) -> None:
        self._base_model = self.now()
        self._base_wall = self._monotonic()
        self._cap = cap


class BlockPool:
    """The KV cache as numbered blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: Sequence[int]) -> None:
        self._free.extend(block_ids)


@dataclass(eq=False)
class SimRequest:
    """One request inside the engine. Times are model seconds (`ModelClock`)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    kv_mode: KvMode = KvMode.LOCAL
    kv_params: Mapping[str, Any] | None = None  # the kv_transfer_params the request arrived with
    state: State = State.WAITING
    num_computed: int = 0
    num_generated: int = 0
    block_ids: list[int] = field(default_factory=list)
    kv_fetched: bool = False  # the prompt's KV came from a prefill worker
    num_preemptions: int = 0
    arrival: float = 0.0
    scheduled_at: float | None = None  # first admitted to the running batch (or to the KV fetch)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    kv_transfer_result: dict[str, Any] | None = None  # returned to the client (prefill side)
    _events: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_generated

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    async def tokens(self) -> AsyncIterator[int]:
        """Yield the index of every generated token as it is produced; ends when the request finishes."""
        while True:
            index = await self._events.get()
            if index is None:
                return
            yield index


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs. Defaults are vLLM's where vLLM has one."""

    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 256  # vLLM's default
    max_num_batched_tokens: int = 8192  # per-iteration token budget (chunked prefill)
    max_model_len: int = 8192
    time_scale: float = 1.0
    engine_id: str = "sim-engine"
    tp_size: int = 1
    kv_host: str = "127.0.0.1"  # advertised as remote_host to decode workers
    kv_port: int = 5600  # advertised as remote_port (vLLM's NIXL side-channel default port)
    kv_sidecar_url: str | None = None  # advertised as tandem_kv_sidecar (else peers use remote_host)


@dataclass
class _Step:
    scheduled: list[tuple[SimRequest, int]] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def empty(self) -> bool:
        return not self.scheduled


class RequestRejected(ValueError):
    """The request can never run on this engine (too long for the model or the KV cache)."""


class Engine:
    """The continuous-batching loop. Call `start` inside a running event loop, `stop` to end it."""

    def __init__(
        self,
        config: EngineConfig,
        timing: TimingModel,
        *,
        fetcher: KvFetcher | None = None,
        observer: EngineObserver | None = None,
        clock: ModelClock | None = None,
    ) -> None:
        self.config = config
        self.timing = timing
        self.fetcher: KvFetcher = fetcher or ModelledKvFetcher(timing, config.time_scale)
        self.observer: EngineObserver = observer or NullObserver()
        self.clock = clock or ModelClock(config.time_scale)
        self.blocks = BlockPool(config.num_blocks, config.block_size)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.fetching: set[SimRequest] = set()
        self._held: dict[str, list[int]] = {}  # request id -> blocks kept for a decode worker to read
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")
            self._publish_state()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._background.clear()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------------------------ requests

    def validate(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise `RequestRejected` for a request that can never run (vLLM rejects these up front)."""
        if prompt_tokens < 1:
            raise RequestRejected("The prompt must contain at least one token.")
        if max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1.")
        total = prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, "
                f"you requested {total} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or completion."
            )
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise RequestRejected(
                f"The request needs {total} tokens of KV cache; this worker holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}."
            )

    def submit(self, request: SimRequest) -> SimRequest:
        """Queue a request (validate it first). Its tokens arrive through `SimRequest.tokens`."""
        self.validate(request.prompt_tokens, request.max_tokens)
        request.arrival = self.clock.now()
        request.state = State.WAITING
        self.waiting.append(request)
        self._publish_state()
        self._wake.set()
        return request

    def abort(self, request: SimRequest) -> None:
        """Drop a request wherever it is and free its blocks (a client went away)."""
        if request.finished:
            return
        if request in self.running:
            self.running.remove(request)
        with contextlib.suppress(ValueError):
            self.waiting.remove(request)
        self.fetching.discard(request)
        self._free(request)
        request.state = State.FINISHED
        request.finish_reason = "abort"
        request.finished_at = self.clock.now()
        request._events.put_nowait(None)
        self._publish_state()
        self._wake.set()

    # ---------------------------------------------------------------------------------------- loop

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            step = self._schedule()
            self._publish_state()
            if step.empty:
                self.clock.release()
                await self._wake.wait()
                continue
            seconds = self._iteration_seconds(step)
            self.clock.begin_iteration(seconds)
            await asyncio.sleep(seconds * self.config.time_scale)
            self.clock.end_iteration()
            self._complete(step)

    def _schedule(self) -> _Step:
        step = _Step()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._ensure_blocks(request, request.num_computed + n):
                victim = self.running.pop()  # the most recently admitted request
                self._preempt(victim)
                step.num_preemptions += 1
                # Victims come from the tail, never from the requests already scheduled; if the victim
                # was this request the loop moves on, otherwise it retries with the freed blocks.
                continue
            step.scheduled.append((request, n))
            budget -= n
            index += 1
        if step.num_preemptions == 0:
            budget = self._admit(step, budget)
        return step

    def _admit(self, step: _Step, budget: int) -> int:
        """Admit waiting requests FCFS; a request pulling remote KV holds one of the max_num_seqs slots."""
        while self.waiting and budget > 0:
            if len(self.running) + len(self.fetching) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if request.kv_mode is KvMode.REMOTE_PREFILL and request.num_computed == 0:
                if not self._ensure_blocks(request, request.prompt_tokens):
                    break
                self.waiting.popleft()
                self._start_fetch(request)
                continue
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._ensure_blocks(request, request.num_computed + n):
                break
            self.waiting.popleft()
            request.state = State.RUNNING
            if request.scheduled_at is None:
                request.scheduled_at = self.clock.now()
            self.running.append(request)
            step.scheduled.append((request, n))
            budget -= n
        return budget

    def _ensure_blocks(self, request: SimRequest, tokens: int) -> bool:
        missing = self.blocks.blocks_for(tokens) - len(request.block_ids)
        if missing <= 0:
            return True
        new = self.blocks.allocate(missing)
        if new is None:
            return False
        request.block_ids.extend(new)
        return True

    def _preempt(self, request: SimRequest) -> None:
        self._free(request)
        request.num_computed = 0
        request.kv_fetched = False
        request.num_preemptions += 1
        request.state = State.WAITING
        if request.kv_mode is KvMode.REMOTE_PREFILL:
            request.kv_mode = KvMode.LOCAL  # the remote KV is gone from this worker: recompute it
        self.waiting.appendleft(request)

    def _free(self, request: SimRequest) -> None:
        self.blocks.free(request.block_ids)
        request.block_ids = []

    def _iteration_seconds(self, step: _Step) -> float:
        chunks: list[PrefillChunk] = []
        decode_context: list[int] = []
        for request, n in step.scheduled:
            if n > 1 or (request.num_generated == 0 and not request.kv_fetched):
                chunks.append(PrefillChunk(n, request.num_computed))
            else:
                decode_context.append(request.num_computed + n)
        return self.timing.iteration_seconds(chunks, decode_context)

    def _complete(self, step: _Step) -> None:
        now = self.clock.now()
        num_tokens = 0
        generated = 0
        latencies: list[float] = []
        for request, n in step.scheduled:
            if request.finished or request.state is not State.RUNNING:
                continue  # aborted (or preempted) while the iteration ran
            num_tokens += n
            request.num_computed += n
            if request.num_computed < request.num_tokens:
                continue  # a prefill chunk; the prompt is not complete yet
            index = request.num_generated
            request.num_generated += 1
            generated += 1
            if request.first_token_at is None:
                request.first_token_at = now
                self.observer.on_first_token(now - request.arrival, request.prompt_tokens)
            elif request.last_token_at is not None:
                latencies.append(now - request.last_token_at)
            request.last_token_at = now
            request._events.put_nowait(index)
            if request.num_generated >= request.max_tokens:
                self._finish(request, now)
        self.observer.on_iteration(num_tokens, step.num_preemptions)
        if generated:
            self.observer.on_tokens(generated, latencies)
        self._publish_state()

    def _finish(self, request: SimRequest, now: float) -> None:
        self.running.remove(request)
        request.state = State.FINISHED
        request.finish_reason = "length"
        request.finished_at = now
        if request.kv_mode is KvMode.REMOTE_DECODE and request.block_ids:
            self._hold_for_remote_decode(request)
        else:
            self._free(request)
        self.observer.on_finished(request)
        request._events.put_nowait(None)

    # ------------------------------------------------------------------------- disaggregated P/D

    def _hold_for_remote_decode(self, request: SimRequest) -> None:
        """Keep the prompt's blocks for the decode worker to read, and describe them to it."""
        prompt_blocks = request.block_ids[: self.blocks.blocks_for(request.prompt_tokens)]
        spare = request.block_ids[len(prompt_blocks) :]
        self.blocks.free(spare)
        request.block_ids = []
        request.kv_transfer_result = build_remote_prefill_params(request, prompt_blocks, self.config)
        self._held[request.request_id] = prompt_blocks
        hold = self.timing.kv_transfer_seconds(request.prompt_tokens) * self.config.time_scale
        asyncio.get_running_loop().call_later(hold, self.release_held, request.request_id)

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-only request kept for its decode worker."""
        blocks = self._held.pop(request_id, None)
        if blocks is None:
            return False
        self.blocks.free(blocks)
        self._publish_state()
        self._wake.set()
        return True

    def _start_fetch(self, request: SimRequest) -> None:
        request.state = State.FETCHING
        request.scheduled_at = self.clock.now()
        self.fetching.add(request)
        fetch = KvFetch(
            request_id=request.request_id,
            params=dict(request.kv_params or {}),
            num_tokens=request.prompt_tokens,
            local_block_ids=tuple(request.block_ids),
        )
        task = asyncio.get_running_loop().create_task(self._fetch(request, fetch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch(self, request: SimRequest, fetch: KvFetch) -> None:
        try:
            await self.fetcher.fetch(fetch)
            ok = True
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("Failed to fetch KV for request %s; recomputing it locally", request.request_id)
            ok = False
        self.observer.on_kv_fetch(ok)
        if request not in self.fetching:
            return  # aborted meanwhile
        self.fetching.discard(request)
        request.state = State.RUNNING
        if ok:
            request.kv_fetched = True
            # vLLM recomputes the last prompt token to get the logits for the first output token.
            request.num_computed = request.prompt_tokens - 1
        else:
            request.kv_mode = KvMode.LOCAL
            request.num_computed = 0
        self.running.append(request)
        self._publish_state()
        self._wake.set()

    # --------------------------------------------------------------------------------- reporting

    @property
    def num_waiting(self) -> int:
        """Waiting requests as vLLM counts them: queued plus those waiting for remote KV."""
        return len(self.waiting) + len(self.fetching)

    def _publish_state(self) -> None:
        self.observer.on_scheduler_state(len(self.running), self.num_waiting, self.blocks.usage)


def build_remote_prefill_params(
    request: SimRequest, prompt_block_ids: Sequence[int], config: EngineConfig
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill worker returns, shaped like vLLM's NIXL connector's
    (``request_finished`` in pull mode): the decode worker passes them back in its request."""
    params: dict[str, Any] = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(prompt_block_ids)],  # one list per KV-cache group; we have one group
        "remote_engine_id": config.engine_id,
        "remote_request_id": request.request_id,
        "remote_host": config.kv_host,
        "remote_port": config.kv_port,
        "tp_size": config.tp_size,
        "pp_size": 1,
        "remote_num_tokens": request.prompt_tokens,
        "transfer_mode": "pull",
    }
    if config.kv_sidecar_url:
        params["tandem_kv_sidecar"] = config.kv_sidecar_url
    return params


def classify_kv_params(params: Mapping[str, Any] | None) -> KvMode:
    """Which side of a P/D transfer a request is on, from its ``kv_transfer_params``.

    A decode request whose prefill produced no blocks (vLLM sends an empty ``remote_block_ids`` when the
    prompt fits no whole block) has nothing to pull and runs as an ordinary request.
    """
    if not params:
        return KvMode.LOCAL
    if params.get("do_remote_decode"):
        return KvMode.REMOTE_DECODE
    if params.get("do_remote_prefill") and any(_flatten_block_ids(params.get("remote_block_ids"))):
        return KvMode.REMOTE_PREFILL
    return KvMode.LOCAL


def _flatten_block_ids(value: object) -> list[int]:
    """``remote_block_ids`` is a flat list in older vLLM and a list per KV-cache group in newer."""
    if not isinstance(value, list | tuple):
        return []
    flat: list[int] = []
    for item in value:
        if isinstance(item, list | tuple):
            flat.extend(int(i) for i in item)
        elif isinstance(item, int):
            flat.append(item)
    return flat
