"""The simulated worker's engine with a fake timing model: batching, chunked prefill, KV blocks,
preemption, interference, P/D hand-off and the model clock. No HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from tandem.sim.worker_engine import (
    Engine,
    EngineConfig,
    KvFetch,
    KvMode,
    ModelClock,
    PrefillChunk,
    RequestRejected,
    SimRequest,
    State,
    build_remote_prefill_params,
    classify_kv_params,
)

TIME_SCALE = 0.01


class FakeTiming:
    """Linear costs that make every iteration's composition visible in its duration."""

    def __init__(self) -> None:
        self.iterations: list[tuple[tuple[PrefillChunk, ...], tuple[int, ...]]] = []

    def iteration_seconds(self, prefill: Sequence[PrefillChunk], decode_context: Sequence[int]) -> float:
        self.iterations.append((tuple(prefill), tuple(decode_context)))
        return self.seconds(prefill, decode_context)

    @staticmethod
    def seconds(prefill: Sequence[PrefillChunk], decode_context: Sequence[int]) -> float:
        return 0.01 + 0.001 * sum(c.tokens for c in prefill) + 0.002 * len(decode_context)

    def kv_transfer_seconds(self, tokens: int) -> float:
        return 0.5 + 1e-5 * tokens


@dataclass
class Recorder:
    """An EngineObserver that keeps everything."""

    states: list[tuple[int, int, float]] = field(default_factory=list)
    iteration_tokens: list[int] = field(default_factory=list)
    preemptions: int = 0
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    generated: int = 0
    itls: list[float] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)
    kv_fetches: list[bool] = field(default_factory=list)

    def on_scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.states.append((running, waiting, kv_usage))

    def on_iteration(self, num_tokens: int, num_preemptions: int) -> None:
        self.iteration_tokens.append(num_tokens)
        self.preemptions += num_preemptions

    def on_first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttfts.append(ttft)
        self.prompt_tokens += prompt_tokens

    def on_tokens(self, num_generated: int, inter_token_latencies: Sequence[float]) -> None:
        self.generated += num_generated
        self.itls.extend(inter_token_latencies)

    def on_finished(self, request: SimRequest) -> None:
        self.finished.append(request)

    def on_kv_fetch(self, ok: bool) -> None:
        self.kv_fetches.append(ok)


@dataclass
class Rig:
    engine: Engine
    timing: FakeTiming
    observer: Recorder


@pytest.fixture
async def rig_factory() -> AsyncIterator[object]:
    engines: list[Engine] = []

    def make(fetcher: object = None, **overrides: object) -> Rig:
        values: dict[str, object] = {"num_blocks": 1000, "time_scale": TIME_SCALE, "engine_id": "p-0"}
        values.update(overrides)
        timing = FakeTiming()
        observer = Recorder()
        engine = Engine(EngineConfig(**values), timing, observer=observer, fetcher=fetcher)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return Rig(engine, timing, observer)

    yield make
    for engine in engines:
        await engine.stop()


async def run_to_end(engine: Engine, request: SimRequest) -> list[int]:
    engine.submit(request)
    return [i async for i in request.tokens()]


async def test_generates_exactly_max_tokens_and_frees_blocks(rig_factory) -> None:
    rig = rig_factory()
    tokens = await run_to_end(rig.engine, SimRequest("r1", prompt_tokens=40, max_tokens=5))
    assert tokens == [0, 1, 2, 3, 4]
    assert rig.observer.generated == 5
    assert rig.observer.prompt_tokens == 40
    assert rig.engine.blocks.num_free == 1000
    (done,) = rig.observer.finished
    assert done.finish_reason == "length"
    # one prefill iteration of the whole prompt, then 4 single-token decode steps
    assert rig.observer.iteration_tokens == [40, 1, 1, 1, 1]


async def test_chunked_prefill_respects_the_token_budget(rig_factory) -> None:
    rig = rig_factory(max_num_batched_tokens=100)
    await run_to_end(rig.engine, SimRequest("r1", prompt_tokens=250, max_tokens=2))
    assert rig.observer.iteration_tokens == [100, 100, 50, 1]
    prefill_chunks = [chunks for chunks, _ in rig.timing.iterations if chunks]
    assert prefill_chunks == [
        (PrefillChunk(100, 0),),
        (PrefillChunk(100, 100),),
        (PrefillChunk(50, 200),),
    ]


async def test_max_num_seqs_bounds_the_running_batch(rig_factory) -> None:
    rig = rig_factory(max_num_seqs=2)
    requests = [SimRequest(f"r{i}", prompt_tokens=8, max_tokens=30) for i in range(5)]
    for request in requests:
        rig.engine.submit(request)
    assert (len(rig.engine.running), rig.engine.num_waiting) == (0, 5)
    await _until(lambda: len(rig.engine.running) == 2)
    assert rig.engine.num_waiting == 3
    await asyncio.gather(*[_drain(r) for r in requests])
    assert max(running for running, _, _ in rig.observer.states) == 2
    assert rig.observer.generated == 5 * 30


async def test_kv_capacity_gates_admission(rig_factory) -> None:
    # 10 blocks of 16 tokens; a prompt takes 6, so the second waits for the first to finish.
    rig = rig_factory(num_blocks=10, max_model_len=1000)
    first = SimRequest("a", prompt_tokens=96, max_tokens=8)
    second = SimRequest("b", prompt_tokens=96, max_tokens=8)
    rig.engine.submit(first)
    rig.engine.submit(second)
    await asyncio.gather(_drain(first), _drain(second))
    # never both running, and KV usage peaked at 7 of 10 blocks (104 tokens of KV)
    assert max(running for running, _, _ in rig.observer.states) == 1
    assert max(waiting for _, waiting, _ in rig.observer.states) == 2
    assert max(usage for _, _, usage in rig.observer.states) == pytest.approx(0.7)
    assert rig.observer.preemptions == 0
    assert rig.engine.blocks.usage == 0


async def test_running_out_of_blocks_preempts_the_newest_request(rig_factory) -> None:
    # Both prompts fit (3 blocks each of 8), but their outputs do not: the later one is preempted,
    # recomputed, and both still finish with all their tokens.
    rig = rig_factory(num_blocks=8, max_model_len=1000)
    first = SimRequest("a", prompt_tokens=48, max_tokens=40)
    second = SimRequest("b", prompt_tokens=48, max_tokens=40)
    rig.engine.submit(first)
    rig.engine.submit(second)
    tokens = await asyncio.gather(_collect(first), _collect(second))
    assert tokens == [list(range(40)), list(range(40))]
    assert rig.observer.preemptions >= 1
    assert second.num_preemptions >= 1
    assert first.num_preemptions == 0
    assert rig.engine.blocks.usage == 0


async def test_decode_tokens_pay_for_a_prefill_in_the_same_iteration(rig_factory) -> None:
    rig = rig_factory()
    decoding = SimRequest("d", prompt_tokens=10, max_tokens=12)
    rig.engine.submit(decoding)
    async for index in decoding.tokens():
        if index == 3:  # mid-decode: a long prompt arrives
            rig.engine.submit(SimRequest("p", prompt_tokens=2000, max_tokens=1))
    pure_decode = FakeTiming.seconds([], [1])
    with_prefill = FakeTiming.seconds([PrefillChunk(2000)], [1])
    assert min(rig.observer.itls) == pytest.approx(pure_decode)
    assert max(rig.observer.itls) == pytest.approx(with_prefill)
    mixed = [(c, d) for c, d in rig.timing.iterations if c and d]
    assert len(mixed) == 1 and mixed[0][0] == (PrefillChunk(2000, 0),)


async def test_abort_frees_the_slot_and_blocks(rig_factory) -> None:
    rig = rig_factory(max_num_seqs=1)
    long = SimRequest("long", prompt_tokens=100, max_tokens=5000)
    queued = SimRequest("queued", prompt_tokens=10, max_tokens=3)
    rig.engine.submit(long)
    rig.engine.submit(queued)
    async for index in long.tokens():
        if index == 2:
            rig.engine.abort(long)
    assert long.finish_reason == "abort"
    assert await _collect(queued) == [0, 1, 2]  # the slot went to the queued request
    assert [r.request_id for r in rig.observer.finished] == ["queued"]
    assert rig.engine.blocks.usage == 0


async def test_rejects_requests_that_can_never_run(rig_factory) -> None:
    rig = rig_factory(num_blocks=4, max_model_len=100)
    with pytest.raises(RequestRejected, match="maximum context length is 100"):
        rig.engine.validate(90, 20)
    with pytest.raises(RequestRejected, match="KV cache"):
        rig.engine.validate(60, 10)  # 70 tokens > 4 blocks x 16
    rig.engine.validate(50, 14)


async def test_prefill_only_request_holds_its_blocks_and_describes_them(rig_factory) -> None:
    rig = rig_factory(kv_host="10.0.0.7", kv_port=5601, tp_size=2)
    request = SimRequest(
        "cmpl-x",
        prompt_tokens=40,
        max_tokens=1,
        kv_mode=KvMode.REMOTE_DECODE,
        kv_params={"do_remote_decode": True},
    )
    assert await run_to_end(rig.engine, request) == [0]
    params = request.kv_transfer_result
    assert params is not None
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "p-0"
    assert params["remote_request_id"] == "cmpl-x"
    assert (params["remote_host"], params["remote_port"], params["tp_size"]) == ("10.0.0.7", 5601, 2)
    assert len(params["remote_block_ids"][0]) == 3  # ceil(40 / 16)
    # held for the decode worker to read, then released after the modelled transfer time
    assert rig.engine.blocks.num_free == 1000 - 3
    await _until(lambda: rig.engine.blocks.num_free == 1000)


class RecordingFetcher:
    def __init__(self, fail: bool = False) -> None:
        self.fetches: list[KvFetch] = []
        self.fail = fail

    async def fetch(self, fetch: KvFetch) -> None:
        self.fetches.append(fetch)
        await asyncio.sleep(0.001)
        if self.fail:
            raise ConnectionError("prefill worker unreachable")


async def test_remote_prefill_pulls_kv_and_recomputes_only_the_last_token(rig_factory) -> None:
    fetcher = RecordingFetcher()
    rig = rig_factory(fetcher=fetcher)
    params = {"do_remote_prefill": True, "remote_block_ids": [[7, 8, 9]], "remote_engine_id": "p-0"}
    request = SimRequest(
        "d1", prompt_tokens=40, max_tokens=4, kv_mode=classify_kv_params(params), kv_params=params
    )
    assert request.kv_mode is KvMode.REMOTE_PREFILL
    assert await run_to_end(rig.engine, request) == [0, 1, 2, 3]
    (fetch,) = fetcher.fetches
    assert fetch.params["remote_engine_id"] == "p-0"
    assert fetch.num_tokens == 40
    assert len(fetch.local_block_ids) == 3
    # no prefill compute here: four single-token iterations (the last prompt token, then 3 decodes)
    assert rig.observer.iteration_tokens == [1, 1, 1, 1]
    assert all(not chunks for chunks, _ in rig.timing.iterations)
    assert rig.observer.prompt_tokens == 40
    assert rig.observer.kv_fetches == [True]


async def test_failed_kv_pull_falls_back_to_a_local_prefill(rig_factory) -> None:
    rig = rig_factory(fetcher=RecordingFetcher(fail=True))
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2, 3]}  # older flat format
    request = SimRequest(
        "d2", prompt_tokens=40, max_tokens=2, kv_mode=classify_kv_params(params), kv_params=params
    )
    assert await run_to_end(rig.engine, request) == [0, 1]
    assert rig.observer.iteration_tokens == [40, 1]
    assert rig.observer.kv_fetches == [False]  # counted: a silent recompute is what it exposes


def test_classify_kv_params() -> None:
    assert classify_kv_params(None) is KvMode.LOCAL
    assert classify_kv_params({"do_remote_decode": True, "do_remote_prefill": False}) is KvMode.REMOTE_DECODE
    assert classify_kv_params({"do_remote_prefill": True, "remote_block_ids": [[4]]}) is KvMode.REMOTE_PREFILL
    # a prompt shorter than a block leaves nothing to pull: served as an ordinary request
    assert classify_kv_params({"do_remote_prefill": True, "remote_block_ids": [[]]}) is KvMode.LOCAL


def test_remote_prefill_params_round_trip() -> None:
    config = EngineConfig(num_blocks=10, engine_id="e")
    request = SimRequest("r", prompt_tokens=20, max_tokens=1, state=State.FINISHED)
    params = build_remote_prefill_params(request, [3, 4], config)
    assert classify_kv_params(params) is KvMode.REMOTE_PREFILL
    assert params["remote_num_tokens"] == 20
    assert "tandem_kv_sidecar" not in params  # peers use remote_host and the sidecar port
    advertised = EngineConfig(num_blocks=10, engine_id="e", kv_sidecar_url="http://127.0.0.1:9")
    params = build_remote_prefill_params(request, [3, 4], advertised)
    assert params["tandem_kv_sidecar"] == "http://127.0.0.1:9"


def test_model_clock_scales_idle_time_and_freezes_between_iterations() -> None:
    wall = [100.0]
    clock = ModelClock(0.01, monotonic=lambda: wall[0])
    wall[0] += 0.5  # idle: half a wall second is 50 model seconds
    assert clock.now() == pytest.approx(50.0)
    clock.begin_iteration(2.0)
    wall[0] += 0.005  # a quarter of the way through the iteration (0.02 wall seconds)
    assert clock.now() == pytest.approx(50.5)
    wall[0] += 1.0  # overrun (event-loop overhead) is not model time
    assert clock.now() == pytest.approx(52.0)
    clock.end_iteration()
    wall[0] += 0.003  # between back-to-back iterations: frozen
    assert clock.now() == pytest.approx(52.0)
    clock.begin_iteration(1.0)
    clock.end_iteration()
    assert clock.now() == pytest.approx(53.0)
    clock.release()
    wall[0] += 0.01
    assert clock.now() == pytest.approx(54.0)
    with pytest.raises(ValueError):
        ModelClock(0)


async def _collect(request: SimRequest) -> list[int]:
    return [i async for i in request.tokens()]


async def _drain(request: SimRequest) -> None:
    async for _ in request.tokens():
        pass


async def _until(predicate: object, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), timeout)
