"""The KV-transfer sidecar over real NIXL (UCX) on loopback: byte-exact, layer by layer, translated.

Skipped when NIXL is not installed (``pip install --no-deps nixl-cu12``; see worker-images/kv-sidecar).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from tandem.sidecar.core import KvSidecar, RemoteRequest, SidecarConfig
from tandem.sidecar.layout import BlockFormat, KvGeometry, pattern_tokens
from tandem.sidecar.probe import FabricReport
from tandem.sidecar.server import ServerSettings, SidecarServer
from tandem.sidecar.transport import NixlTransport, TransportError, load_nixl

try:
    load_nixl()
except TransportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)

# Llama-3.1-8B (config.json: 32 layers, 8 KV heads of 128, bf16) at tensor-parallel 1.
LLAMA_8B = KvGeometry(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)
PROMPT = 2048
MiB = 1 << 20

_counter = iter(range(10_000))


def make(fmt: BlockFormat, blocks: int, prefix: str) -> KvSidecar:
    name = f"{prefix}-{next(_counter)}"
    return KvSidecar(SidecarConfig(name, LLAMA_8B, fmt, blocks, staging_bytes=16 * MiB), NixlTransport(name))


@pytest.fixture(scope="module")
def prefill() -> Iterator[KvSidecar]:
    yield make(BlockFormat("NHD", 16), PROMPT // 16 + 8, "prefill")


def check_exact(decode: KvSidecar, block_ids: list[int], seed: int, tokens: int) -> None:
    for layer in range(LLAMA_8B.layers):
        got = decode.read_tokens(block_ids, layer, tokens)
        want = pattern_tokens(seed, layer, LLAMA_8B, tokens)
        assert got.tobytes() == want.tobytes(), f"layer {layer} differs"


@pytest.mark.parametrize(
    ("decode_fmt", "tokens"),
    [
        (BlockFormat("NHD", 16), PROMPT),  # NVIDIA -> NVIDIA: straight into the pool
        (BlockFormat("HND", 128), PROMPT),  # NVIDIA -> Gaudi: layout and block size translated
        (BlockFormat("HND", 16), 300),
        (BlockFormat("NHD", 32), 300),
    ],
    ids=str,
)
def test_pull_llama_8b_prompt_byte_exact(prefill: KvSidecar, decode_fmt: BlockFormat, tokens: int) -> None:
    decode = make(decode_fmt, decode_fmt.blocks_for(tokens) + 2, "decode")
    rid = f"req-{decode_fmt.layout}-{decode_fmt.block_size}"
    record = prefill.produce(rid, tokens)
    prefill.fill(record)
    result = decode.pull(prefill.info(), RemoteRequest.from_dict(record.to_dict()))
    assert result.bytes == LLAMA_8B.layers * 16 * -(-tokens // 16) * LLAMA_8B.token_bytes()
    if tokens == PROMPT:
        assert result.bytes == LLAMA_8B.request_bytes(PROMPT) == 256 * MiB
    assert result.translated == (decode_fmt != prefill.config.fmt)
    assert len(result.layer_done_at) == LLAMA_8B.layers
    check_exact(decode, result.block_ids, record.seed, tokens)
    # the decode side's "done" notification frees the prefill's blocks
    for _ in range(2000):
        if prefill.handle_notifications():
            break
        threading.Event().wait(0.001)
    assert rid not in prefill.produced


def test_layer_by_layer_pull_waits_for_each_layer(prefill: KvSidecar) -> None:
    """The decode side reads a layer only after the prefill published it, and lands layers in order."""
    decode = make(BlockFormat("HND", 128), PROMPT // 128 + 1, "decode")
    record = prefill.produce("paced", PROMPT)
    published: list[int] = []
    gate = threading.Semaphore(0)

    def produce() -> None:
        for layer in range(LLAMA_8B.layers):
            gate.acquire()
            prefill.write_layer(record, layer)
            published.append(layer)

    thread = threading.Thread(target=produce)
    thread.start()
    # release layers one at a time while the pull runs
    results: list[Any] = []
    puller = threading.Thread(
        target=lambda: results.append(decode.pull(prefill.info(), RemoteRequest.from_dict(record.to_dict())))
    )
    puller.start()
    for _ in range(LLAMA_8B.layers):
        gate.release()
    puller.join(timeout=300)
    thread.join(timeout=60)
    (result,) = results
    assert published == list(range(LLAMA_8B.layers))
    assert result.layer_done_at == sorted(result.layer_done_at)
    check_exact(decode, result.block_ids, record.seed, PROMPT)
    prefill.release("paced")


def test_layers_ready_together_go_in_one_read(prefill: KvSidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull that starts after the prefill finished reads the layers COALESCE at a time (a READ
    has a fixed cost), and still lands every layer, in order, byte-exact."""
    decode = make(BlockFormat("NHD", 16), PROMPT // 16 + 8, "decode")
    record = prefill.produce("coalesced", PROMPT)
    prefill.fill(record)
    sizes: list[int] = []
    real = decode.transport.read

    def counting(peer: str, local: Any, remote: Any, notify: bytes = b"") -> Any:
        sizes.append(sum(n for _, n in local))
        return real(peer, local, remote, notify)

    monkeypatch.setattr(decode.transport, "read", counting)
    result = decode.pull(prefill.info(), RemoteRequest.from_dict(record.to_dict()))
    layer_bytes = LLAMA_8B.request_bytes(PROMPT) // LLAMA_8B.layers
    data = [n for n in sizes if n >= layer_bytes]  # the rest are 8-byte progress polls
    assert data == [KvSidecar.COALESCE * layer_bytes] * (LLAMA_8B.layers // KvSidecar.COALESCE)
    assert len(result.layer_done_at) == LLAMA_8B.layers
    assert result.layer_done_at == sorted(result.layer_done_at)
    check_exact(decode, result.block_ids, record.seed, PROMPT)
    prefill.release("coalesced")


def test_odd_prompt_length_and_fragmented_blocks(prefill: KvSidecar) -> None:
    decode = make(BlockFormat("HND", 128), 12, "decode")
    hole = decode.blocks.allocate(3)  # fragment the decode pool: the pull cannot get one run
    decode.blocks.free(hole[1:2])
    tokens = 1000
    record = prefill.produce("odd", tokens)
    prefill.fill(record)
    result = decode.pull(prefill.info(), RemoteRequest.from_dict(record.to_dict()))
    assert len(result.block_ids) == 8
    check_exact(decode, result.block_ids, record.seed, tokens)


@pytest.mark.parametrize("decode_fmt", [BlockFormat("NHD", 16), BlockFormat("HND", 128)], ids=str)
def test_pull_with_transfer_threads(decode_fmt: BlockFormat) -> None:
    """The same-host setting: NIXL's thread pool (two UCX workers on their own threads) shares each
    layer's READ, cut into pieces; the KV still lands byte-exact, translated or not."""
    names = [f"threads-{next(_counter)}" for _ in range(2)]
    prefill = KvSidecar(
        SidecarConfig(names[0], LLAMA_8B, BlockFormat("NHD", 16), PROMPT // 16 + 8, staging_bytes=16 * MiB),
        NixlTransport(names[0], threads=2),
    )
    transport = NixlTransport(names[1], threads=2)
    decode = KvSidecar(
        SidecarConfig(
            names[1], LLAMA_8B, decode_fmt, decode_fmt.blocks_for(PROMPT) + 2, staging_bytes=16 * MiB
        ),
        transport,
    )
    assert len(transport._split([(0, 8 * MiB)], [(0, 8 * MiB)])[0]) == 2 * NixlTransport.SPLIT_BATCH
    for rid in ("t1", "t2"):  # twice: the second pull reuses the thread pool's connections
        record = prefill.produce(rid, PROMPT)
        prefill.fill(record)
        result = decode.pull(prefill.info(), RemoteRequest.from_dict(record.to_dict()))
        assert result.bytes == 256 * MiB and result.translated == (decode_fmt != prefill.config.fmt)
        check_exact(decode, result.block_ids, record.seed, PROMPT)
        decode.release(rid)
        prefill.release(rid)


# ---- over HTTP, the way pods use it -----------------------------------------------------------


async def _serve(server: SidecarServer) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.build_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def two_servers() -> AsyncIterator[tuple[str, str, SidecarServer, SidecarServer]]:
    p = SidecarServer(
        make(BlockFormat("NHD", 16), 300, "p-http"),
        FabricReport(expected="tcp", allow_tcp_fallback=False),
        settings=ServerSettings(probe_interval_seconds=3600),
    )
    d = SidecarServer(
        make(BlockFormat("HND", 128), 40, "d-http"),
        FabricReport(expected="tcp", allow_tcp_fallback=False),
        settings=ServerSettings(probe_interval_seconds=3600),
    )
    pr, purl = await _serve(p)
    dr, durl = await _serve(d)
    try:
        yield purl, durl, d, p
    finally:
        await dr.cleanup()
        await pr.cleanup()


async def test_http_pull_and_metrics(two_servers: tuple[str, str, SidecarServer, SidecarServer]) -> None:
    import aiohttp

    purl, durl, d, p = two_servers
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{durl}/readyz") as r:
            assert r.status == 200
        body = {"peer": purl, "requestId": "http-1", "numTokens": PROMPT, "verify": True}
        async with s.post(f"{durl}/v1/kv/pull", json=body) as r:
            out = await r.json()
            assert r.status == 200, out
        assert out["bytes"] == 256 * MiB and out["verified"] is True and out["translated"] is True
        async with s.get(f"{durl}/metrics") as r:
            text = await r.text()
        assert 'tandem_kv_transfer_bytes_total{direction="pull"} 2.68435456e+08' in text
        assert "tandem_kv_transfer_seconds_count 1.0" in text
        assert 'tandem_kv_transport{transport="tcp"} 1.0' in text
        async with s.get(f"{durl}/v1/probe", params={"peer": purl}) as r:
            assert r.status == 200 and (await r.json())["bytesPerSecond"] > 0
        async with s.post(f"{durl}/v1/kv/pull", json={**body, "peer": "http://127.0.0.1:9"}) as r:
            assert r.status == 502
    assert d.sidecar.blocks.num_free == 40  # released after the pull
    for _ in range(500):  # the prefill side frees on the "done" notification (housekeeping loop)
        if not p.sidecar.produced:
            break
        await asyncio.sleep(0.01)
    assert not p.sidecar.produced
    async with aiohttp.ClientSession() as s, s.get(f"{purl}/metrics") as r:
        assert 'tandem_kv_transfer_bytes_total{direction="serve"} 2.68435456e+08' in await r.text()


def without_rdma(prefix: str) -> SidecarServer:
    """A sidecar expecting RDMA, with no RDMA device and no TCP fallback allowed."""
    return SidecarServer(
        make(BlockFormat("NHD", 16), 4, prefix),
        FabricReport(expected="rdma", allow_tcp_fallback=False, rdma_devices=[]),
        settings=ServerSettings(probe_interval_seconds=3600),
    )


async def test_readyz_reports_tcp_fallback(caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    caplog.set_level(logging.INFO, logger="tandem.sidecar")
    server = without_rdma("fallback")
    runner, url = await _serve(server)
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/readyz") as r:
            body = await r.json()
        assert r.status == 503 and body["reason"] == "TcpFallback"
        async with aiohttp.ClientSession() as s, s.get(f"{url}/readyz") as r:
            assert r.status == 503
        # the log says why, once (the operator's SidecarNotReady message points at it)
        said = [r.getMessage() for r in caplog.records if "TcpFallback" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("Not ready: TcpFallback: ") and "RDMA" in said[0]
    finally:
        await runner.cleanup()


async def test_the_operators_probe_reads_a_real_sidecars_fallback() -> None:
    """tandem.kv_probe against a real sidecar HTTP server whose RDMA is not there: the answer
    names TCP (what turns KVTransferReady into TcpFallback); an address nobody serves is unknown."""
    from tandem.kv_probe import ask

    server = without_rdma("probed")
    runner, url = await _serve(server)
    try:
        got = await ask({"d-0": f"{url}/readyz", "gone": "http://127.0.0.1:9/readyz"}, timeout_s=2.0)
    finally:
        await runner.cleanup()
    status, body = got["d-0"]
    assert status == 503 and body is not None
    assert (body["transport"], body["reason"]) == ("tcp", "TcpFallback")
    assert got["gone"] == (None, None)


async def test_sim_decode_worker_pulls_through_sidecar(
    two_servers: tuple[str, str, SidecarServer, SidecarServer],
) -> None:
    """The simulated decode worker's `SidecarKvFetcher` moves the prompt's real KV bytes."""
    from tandem.sim.worker_engine import KvFetch
    from tandem.sim.worker_kv import SidecarKvFetcher

    purl, durl, _, _ = two_servers
    fetcher = SidecarKvFetcher(durl)
    params = {"do_remote_prefill": True, "remote_request_id": "sim-1", "tandem_kv_sidecar": purl}
    await fetcher.fetch(KvFetch("sim-1", params, 512, (0, 1)))
    assert fetcher.last_result is not None
    assert fetcher.last_result["bytes"] == LLAMA_8B.request_bytes(512)
    assert np.isclose(fetcher.last_result["bytes"], 512 * 131072)


async def test_prefill_and_decode_sim_workers_hand_off_real_kv(
    two_servers: tuple[str, str, SidecarServer, SidecarServer],
) -> None:
    """vLLM's two-step P/D protocol between two simulated workers, the KV moving sidecar to sidecar."""
    import aiohttp

    from tandem.sim.worker import SimWorker, WorkerSettings, start_server
    from tandem.sim.worker_engine import Role
    from tandem.sim.worker_kv import SidecarKvFetcher

    purl, durl, _, _ = two_servers
    prefill_sidecar_port = int(purl.rsplit(":", 1)[1])
    base = {"model": "llama-3.1-8b", "accelerator": "h100", "time_scale": 0.01}
    prefill = SimWorker(WorkerSettings(**base, role=Role.PREFILL, kv_host="127.0.0.1"))
    fetcher = SidecarKvFetcher(durl, peer_port=prefill_sidecar_port, verify=True)
    decode = SimWorker(WorkerSettings(**base, role=Role.DECODE), kv_fetcher=fetcher)
    runners = []
    try:
        urls = []
        for worker in (prefill, decode):
            runner, port = await start_server(worker, "127.0.0.1", 0)
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
        prompt = list(range(1000))
        async with aiohttp.ClientSession() as s:
            p_req = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
            async with s.post(f"{urls[0]}/v1/completions", json=p_req) as r:
                params = (await r.json())["kv_transfer_params"]
            d_req = {"prompt": prompt, "max_tokens": 4, "kv_transfer_params": params}
            async with s.post(f"{urls[1]}/v1/completions", json=d_req) as r:
                body = await r.json()
                assert r.status == 200, body
        assert body["usage"]["completion_tokens"] == 4
        assert decode.engine.fetcher is fetcher and fetcher.last_result is not None
        assert fetcher.last_result["verified"] is True
        # 1,000 tokens in 63 16-token blocks per layer, 64 KiB each, 32 layers; translated to HND/128
        assert fetcher.last_result["bytes"] == 32 * 63 * 65536 and fetcher.last_result["translated"] is True
        assert fetcher.last_result["requestId"] == params["remote_request_id"]
    finally:
        for runner in runners:
            await runner.cleanup()


def test_kv_bench_measures_what_its_goals_name() -> None:
    """``make bench-kv`` in one short run: every measure is there, and the exposure goal's unit
    is one layer's READ alone (transfer + setup), measured, not the whole pull over the layers."""
    from tandem.sidecar import bench

    report = bench.run(runs=1, threads=2)
    tput, exposed = report["throughput"], report["exposed"]
    reads = tput["one_layer_read_seconds"]
    assert len(reads) == 20 and all(t > 0 for t in reads)
    assert exposed["one_layer_transfer_seconds"] == tput["one_layer_read_seconds_median"]
    assert report["exposed_over_one_layer"] == pytest.approx(
        exposed["exposed_pipelined_seconds"] / tput["one_layer_read_seconds_median"]
    )
    assert report["kv_bytes"] == 256 * MiB == tput["bytes"]
    assert report["throughput_ratio_vs_memcpy"] == pytest.approx(
        min(tput["memcpy_seconds"]) / min(tput["transfer_seconds"])
    )
    assert report["translate_us_per_block"] > 0
    assert set(report["goals"]) == {"throughput_ratio_vs_memcpy", "exposed_over_one_layer"}
