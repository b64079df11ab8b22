"""KV block layout translation, region bookkeeping, the fabric probe's parsing, and the sidecar's pull
logic over an in-process copy transport (no NIXL needed; tests/test_kv_nixl.py runs the real one)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from itertools import product
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tandem.sidecar.core import (
    BlockAllocator,
    KvSidecar,
    OutOfBlocks,
    RemoteRequest,
    SidecarConfig,
    paired_regions,
    runs,
)
from tandem.sidecar.layout import (
    BlockFormat,
    KvGeometry,
    from_tokens,
    pattern_tokens,
    to_tokens,
    translate_blocks,
)
from tandem.sidecar.probe import (
    FabricReport,
    ProtoInfoParser,
    ReadProtocol,
    classify_lanes,
    classify_tl,
    parse_ucx_line,
    with_read_protocol,
)
from tandem.sidecar.transport import NixlTransport, Region, TransportError

GEOM = KvGeometry(layers=3, kv_heads=4, head_dim=8, dtype_bytes=2)
FORMATS = [BlockFormat(layout, bs) for layout in ("NHD", "HND") for bs in (4, 16, 32, 12)]


def blocks_with(tokens: npt.NDArray[np.uint16], fmt: BlockFormat, geom: KvGeometry) -> npt.NDArray[np.uint8]:
    out = np.full((fmt.blocks_for(tokens.shape[1]), fmt.block_bytes(geom)), 0xEE, dtype=np.uint8)
    from_tokens(tokens, fmt, geom, out)
    return out


@pytest.mark.parametrize(("src", "dst"), list(product(FORMATS, FORMATS)), ids=str)
@pytest.mark.parametrize("num_tokens", [1, 31, 32, 100])
def test_translation_is_byte_exact(src: BlockFormat, dst: BlockFormat, num_tokens: int) -> None:
    tokens = pattern_tokens(7, 1, GEOM, num_tokens)
    src_blocks = blocks_with(tokens, src, GEOM)
    out = np.zeros((dst.blocks_for(num_tokens), dst.block_bytes(GEOM)), dtype=np.uint8)
    translate_blocks(src_blocks, src, dst, GEOM, num_tokens, out)
    assert to_tokens(out, dst, GEOM, num_tokens).tobytes() == tokens.tobytes()


def test_layouts_really_differ_and_fp8_words() -> None:
    tokens = pattern_tokens(1, 0, GEOM, 16)
    nhd = blocks_with(tokens, BlockFormat("NHD", 16), GEOM)
    hnd = blocks_with(tokens, BlockFormat("HND", 16), GEOM)
    assert nhd.tobytes() != hnd.tobytes() and sorted(nhd.tobytes()) == sorted(hnd.tobytes())
    # token-major: token 1 of head 0 follows token 0's heads in NHD
    words = nhd.view(np.uint16).reshape(2, 16, 4, 8)
    assert np.array_equal(words[0, 1, 0], tokens[0, 1, 0])
    fp8 = KvGeometry(layers=1, kv_heads=2, head_dim=4, dtype_bytes=1)
    t8 = pattern_tokens(3, 0, fp8, 20)
    assert t8.dtype == np.uint8
    b = blocks_with(t8, BlockFormat("HND", 16), fp8)
    out = np.zeros((3, BlockFormat("NHD", 8).block_bytes(fp8)), dtype=np.uint8)
    translate_blocks(b, BlockFormat("HND", 16), BlockFormat("NHD", 8), fp8, 20, out)
    assert to_tokens(out, BlockFormat("NHD", 8), fp8, 20).tobytes() == t8.tobytes()


def test_patterns_differ_by_layer_and_request() -> None:
    a = pattern_tokens(1, 0, GEOM, 8)
    assert a.tobytes() != pattern_tokens(1, 1, GEOM, 8).tobytes()
    assert a.tobytes() != pattern_tokens(2, 0, GEOM, 8).tobytes()
    assert len(np.unique(a)) > a.size // 4


def test_runs_and_paired_regions() -> None:
    assert runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert runs([]) == []
    lo, ro = paired_regions([(100, 10), (200, 6)], [(1000, 4), (2000, 12)])
    assert lo == [(100, 4), (104, 6), (200, 6)]
    assert ro == [(1000, 4), (2000, 6), (2006, 6)]


def test_allocator_prefers_contiguous_runs() -> None:
    alloc = BlockAllocator(10)
    a = alloc.allocate(3)
    b = alloc.allocate(2)
    alloc.free(a[1:2])
    assert alloc.allocate(3) == [5, 6, 7]  # not [1, 8, 9]
    assert sorted(alloc.allocate(3)) == [1, 8, 9]
    assert alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    assert b == [3, 4]


# ---- the fabric probe ---------------------------------------------------------------------------

TCP_LINE = (
    "[1795323046.380862] [vm:1768 :0]      ucp_worker.c:1997 UCX  INFO    B intra-node cfg#1 "
    "rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)"
)
RDMA_LINE = (
    "[1] [node:1:0] ucp_worker.c:1997 UCX  INFO    decode-0 inter-node cfg#2 "
    "rma_bw(rc_mlx5/mlx5_0:1 rc_mlx5/mlx5_1:1)  am(rc_mlx5/mlx5_0:1)  ka(ud_mlx5/mlx5_0:1)"
)
SELF_LINE = "x ucp_worker.c:1997 UCX  INFO    A self cfg#0 rma_bw(cma/memory)  am(self/memory)"


def test_parse_ucx_lane_selection() -> None:
    tcp = parse_ucx_line(TCP_LINE)
    assert tcp is not None and tcp.worker == "B" and tcp.peer == "intra-node"
    assert tcp.lanes["am"] == ("tcp/lo", "cma/memory") and tcp.data_transport == "tcp"
    rdma = parse_ucx_line(RDMA_LINE)
    assert rdma is not None and rdma.data_transport == "rdma"
    assert parse_ucx_line("UCX  INFO  Version 1.23.0") is None
    self_cfg = parse_ucx_line(SELF_LINE)
    assert self_cfg is not None
    assert classify_lanes([tcp, self_cfg]) == "tcp"  # self endpoints do not count
    assert classify_lanes([tcp, rdma]) == "rdma"
    assert classify_lanes([]) == "none"
    tls = ("dc_mlx5/mlx5_0:1", "ud_verbs/x", "efa/rdmap0", "sysv/memory", "tcp/eth0")
    assert [classify_tl(t) for t in tls] == ["rdma", "rdma", "rdma", "shm", "tcp"]


def _proto_table(worker: str, cfg: int, rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """A ``UCX_PROTO_INFO=y`` READ table as UCX 1.23 prints it (recorded on this host)."""
    head = "[1795332877.988023] [vm:3105 :0]   "
    rule = head + "+--------+-------------+-------------------------------------------+"
    lines = [
        rule,
        head + f"| {worker} intra-node cfg#{cfg}                                               |",
        head + "| remote memory read by ucp_get*(multi) into host memory from host |",
        rule,
        head + "| Range  | Description |                  Config                   |",
        rule,
    ]
    lines += [head + f"| {r} | {d} | {c} |" for r, d, c in rows]
    return [*lines, rule]


def _feed(lines: Sequence[str]) -> list[ReadProtocol]:
    parser = ProtoInfoParser()
    got = [parser.feed(line) for line in [*lines, "next line"]]
    return [g for g in got if g is not None]


def test_read_protocol_tables_decide_the_data_transport() -> None:
    """The lane line says rma_am(tcp/lo), but a READ is a single-copy CMA read: UCX's protocol
    table says so, and the probe believes the table; TCP anywhere in the READ path still says tcp."""
    cma = _feed(_proto_table("B", 1, [("0..inf", "zero-copy  ", "cma/memory")]))
    assert [(p.worker, p.peer, p.cfg, p.tls) for p in cma] == [("B", "intra-node", 1, ("cma/memory",))]
    tcp_line = parse_ucx_line(TCP_LINE)
    assert tcp_line is not None and tcp_line.data_transport == "tcp"  # the line alone: conservative
    configs = with_read_protocol([tcp_line], cma[0])
    assert configs[0].read_tls == ("cma/memory",) and configs[0].data_transport == "shm"
    # the serving side's endpoint (no READ, no table) printed its line last: the READ side decides
    served = parse_ucx_line(TCP_LINE.replace(" B ", " A "))
    assert served is not None
    assert classify_lanes([*configs, served]) == "shm"
    assert classify_lanes([tcp_line, served]) == "tcp"
    emulated = _feed(_proto_table("B", 1, [("0..inf", "software emulation", "tcp/lo")]))
    assert with_read_protocol([tcp_line], emulated[0])[0].data_transport == "tcp"
    mixed = _feed(
        _proto_table(
            "B",
            2,
            [
                ("0..8K", "zero-copy", "cma/memory"),
                ("8K..inf", "multi-frag", "50% on tcp/eth0 and 50% on cma/memory"),
            ],
        )
    )
    (got,) = with_read_protocol([tcp_line], mixed[0])[1:]
    assert got.read_tls == ("cma/memory", "tcp/eth0") and got.data_transport == "tcp"
    rdma = _feed(_proto_table("D", 3, [("0..inf", "zero-copy", "rc_mlx5/mlx5_0:1")]))
    assert with_read_protocol([], rdma[0])[0].data_transport == "rdma"
    # other tables (a write) and stray lines yield nothing
    write = [
        line.replace("remote memory read by ucp_get*(multi) into", "remote memory write by ucp_put* from")
        for line in _proto_table("B", 1, [("0..inf", "zero-copy", "cma/memory")])
    ]
    assert _feed(write) == []


def test_transfer_split_for_nixl_threads() -> None:
    """With transfer threads, a large READ is cut into page-aligned pieces NIXL shares out; small
    reads (progress words) and reads that already have enough regions are left alone."""
    t = object.__new__(NixlTransport)
    t.threads, t.split_min_bytes = 2, 1 << 20
    want = 2 * NixlTransport.SPLIT_BATCH
    lo, ro = t._split([(1 << 30, 8 << 20)], [(2 << 30, 8 << 20)])
    assert len(lo) == want and all(n == (1 << 20) for _, n in lo)
    assert lo[0] == (1 << 30, 1 << 20) and ro[-1] == ((2 << 30) + (7 << 20), 1 << 20)
    odd = [(0, 3 << 20), (10 << 20, (5 << 20) + 123)]
    lo, ro = t._split(odd, [(a + (1 << 40), n) for a, n in odd])
    assert sum(n for _, n in lo) == sum(n for _, n in odd) and [n for _, n in lo] == [n for _, n in ro]
    assert all(r[0] - l_[0] == 1 << 40 for l_, r in zip(lo, ro, strict=True))
    assert all(n % 4096 == 0 for _, n in lo[:-1])
    assert t._split([(0, 8)], [(64, 8)]) == ([(0, 8)], [(64, 8)])
    many = [(i << 20, 1 << 20) for i in range(want)]
    assert t._split(many, many) == (many, many)
    t.threads = 0
    assert t._split([(0, 8 << 20)], [(0, 8 << 20)]) == ([(0, 8 << 20)], [(0, 8 << 20)])


def test_fabric_report_fallback() -> None:
    report = FabricReport(expected="rdma", allow_tcp_fallback=False)
    assert "no RDMA device" in (report.fallback_problem() or "")
    report.rdma_devices = ["mlx5_0"]
    assert report.effective() == "rdma" and report.fallback_problem() is None
    report.selected = "tcp"  # UCX chose TCP for the peer after all
    assert "UCX selected tcp" in (report.fallback_problem() or "")
    report.allow_tcp_fallback = True
    assert report.fallback_problem() is None
    assert FabricReport(expected="tcp", allow_tcp_fallback=False).fallback_problem() is None
    only_tcp = FabricReport(
        expected="rdma", allow_tcp_fallback=False, rdma_devices=["mlx5_0"], ucx_tls=["tcp"]
    )
    assert only_tcp.effective() == "tcp"


# ---- the pull logic, over an in-process copy transport ------------------------------------------


class _Done:
    def done(self) -> bool:
        return True


class CopyTransport:
    """Same-process `KvTransport`: a READ is a memmove. Peers share one address space."""

    backend = "COPY"

    def __init__(self, name: str) -> None:
        self.name = name
        self.notes: dict[str, list[bytes]] = {}
        self.registry: dict[str, CopyTransport] = {}

    def register(self, buffer: npt.NDArray[np.uint8]) -> None:
        pass

    def metadata(self) -> bytes:
        return self.name.encode()

    def add_peer(self, metadata: bytes) -> str:
        return metadata.decode()

    def read(
        self, peer: str, local: Sequence[Region], remote: Sequence[Region], notify: bytes = b""
    ) -> _Done:
        for (la, n), (ra, m) in zip(local, remote, strict=True):
            assert n == m
            ctypes.memmove(la, ra, n)
        return _Done()

    def notify(self, peer: str, message: bytes) -> None:
        self.registry[peer].notes.setdefault(self.name, []).append(message)

    def take_notifications(self) -> dict[str, list[bytes]]:
        notes, self.notes = self.notes, {}
        return notes


def test_pull_over_copy_transport_translates_and_frees() -> None:
    g = KvGeometry(layers=4, kv_heads=2, head_dim=16)
    tp, td = CopyTransport("p"), CopyTransport("d")
    td.registry["p"] = tp
    p = KvSidecar(SidecarConfig("p", g, BlockFormat("NHD", 16), 20, staging_bytes=1 << 20), tp)
    d = KvSidecar(SidecarConfig("d", g, BlockFormat("HND", 64), 5, staging_bytes=1 << 20), td)
    record = p.produce("r", 150)
    p.fill(record)
    result = d.pull(p.info(), RemoteRequest.from_dict(record.to_dict()))
    assert result.translated and len(result.block_ids) == 3 and result.bytes == 4 * 10 * 16 * g.token_bytes()
    for layer in range(4):
        assert (
            d.read_tokens(result.block_ids, layer, 150).tobytes()
            == pattern_tokens(record.seed, layer, g, 150).tobytes()
        )
    assert p.handle_notifications() == 1 and p.blocks.num_free == 20 and not p.produced
    assert d.release("r") and d.blocks.num_free == 5


def test_sim_worker_selects_the_sidecar_fetcher_by_flag() -> None:
    from tandem.sim.worker import SimWorker, parse_settings
    from tandem.sim.worker_engine import ModelledKvFetcher
    from tandem.sim.worker_kv import SidecarKvFetcher

    settings, _ = parse_settings(["--role", "decode", "--kv-sidecar", "http://127.0.0.1:8200"])
    fetcher = SimWorker(settings).engine.fetcher
    assert isinstance(fetcher, SidecarKvFetcher) and fetcher.sidecar_url == "http://127.0.0.1:8200"
    assert fetcher.peer_url({"remote_host": "10.0.0.5"}) == "http://10.0.0.5:8200"
    default, _ = parse_settings(["--role", "decode"])
    assert isinstance(SimWorker(default).engine.fetcher, ModelledKvFetcher)


class _Failed:
    def done(self) -> bool:
        raise TransportError("NIXL transfer failed")


class _Pending:
    """Done after ``polls`` more calls of done(); never when ``polls`` is None."""

    def __init__(self, polls: int | None) -> None:
        self.polls = polls

    def done(self) -> bool:
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0


class ScriptedTransport(CopyTransport):
    """Progress-word READs copy; data READs copy too but report what ``script`` says, in order."""

    def __init__(self, name: str, script: list[Any]) -> None:
        super().__init__(name)
        self.script = script

    def read(self, peer: str, local: Sequence[Region], remote: Sequence[Region], notify: bytes = b"") -> Any:
        done = super().read(peer, local, remote, notify)
        if sum(n for _, n in local) <= 8:
            return done
        return self.script.pop(0) if self.script else done


def _failing_pull(script: list[Any], settle_s: float) -> tuple[KvSidecar, list[str], int]:
    g = KvGeometry(layers=8, kv_heads=2, head_dim=16)
    tp, td = CopyTransport("p"), ScriptedTransport("d", script)
    td.registry["p"] = tp
    events: list[str] = []
    p = KvSidecar(SidecarConfig("p", g, BlockFormat("NHD", 16), 20, staging_bytes=1 << 20), tp)
    d = KvSidecar(
        SidecarConfig("d", g, BlockFormat("NHD", 16), 20, staging_bytes=1 << 20),
        td,
        observer=lambda event, _: events.append(event),
    )
    d.COALESCE = 1  # one READ per layer: four in flight when the first one fails
    d.SETTLE_SECONDS = settle_s
    record = p.produce("r", 150)
    p.fill(record)
    with pytest.raises(TransportError):
        d.pull(p.info(), RemoteRequest.from_dict(record.to_dict()))
    return d, events, len(record.block_ids)


def test_a_failed_pull_waits_out_its_reads_before_freeing_the_blocks() -> None:
    late = _Pending(3)
    d, events, _ = _failing_pull([_Failed(), late, _Done(), _Done()], settle_s=5.0)
    assert late.polls is not None and late.polls < 0  # waited for until it ended
    assert d.blocks.num_free == 20 and "stranded" not in events


def test_a_failed_pull_whose_reads_do_not_end_withholds_its_blocks() -> None:
    d, events, used = _failing_pull([_Failed(), _Pending(None), _Done(), _Done()], settle_s=0.05)
    assert d.blocks.num_free == 20 - used  # never handed to another request
    assert events.count("stranded") == 1
