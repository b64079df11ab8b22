"""The KV-transfer sidecar's engine, without HTTP: a host-memory KV pool, NIXL, layer-wise pulls.

Memory (all registered with NIXL once, at start):

- the **pool**: ``layers x num_blocks`` blocks of this worker's block format, layer-major, so one
  layer of a request whose blocks are contiguous is one region;
- a **progress table**: one 64-bit word per produce slot, the number of layers of that request the
  prefill has finished; the decode side READs it, so readiness needs no extra message;
- two **staging** buffers, used when the peer's block format differs: layer ``l`` lands in one
  while layer ``l-1`` is translated out of the other.

The decode side pulls (DistServe's choice): it reads a layer as soon as the progress word says it
exists, so a prefill burst cannot flood a decode worker that has no room, and the transfer of all
but the last layer hides behind the prefill's compute.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tandem.sidecar.layout import BlockFormat, Bytes, KvGeometry, pattern_tokens, to_tokens, translate_blocks
from tandem.sidecar.transport import KvTransport, Region, Transfer, TransportError, wait

MiB = 1 << 20
log = logging.getLogger(__name__)


class SidecarError(RuntimeError):
    pass


class OutOfBlocks(SidecarError):
    pass


@dataclass(frozen=True)
class SidecarConfig:
    name: str  # the NIXL agent name; unique per pod (the pod name)
    geometry: KvGeometry
    fmt: BlockFormat
    num_blocks: int
    staging_bytes: int = 64 * MiB  # per staging buffer (two): one layer of the largest translated pull
    slots: int = 1024  # concurrent produced requests


@dataclass(frozen=True)
class PeerInfo:
    """What a sidecar tells peers about itself (``GET /v1/info``)."""

    name: str
    metadata: bytes
    geometry: KvGeometry
    fmt: BlockFormat
    pool_address: int
    num_blocks: int
    progress_address: int

    def block_address(self, layer: int, block: int) -> int:
        return self.pool_address + (layer * self.num_blocks + block) * self.fmt.block_bytes(self.geometry)

    def to_dict(self) -> dict[str, Any]:
        g, f = self.geometry, self.fmt
        return {
            "name": self.name,
            "metadata": base64.b64encode(self.metadata).decode(),
            "geometry": {
                "layers": g.layers,
                "kvHeads": g.kv_heads,
                "headDim": g.head_dim,
                "dtypeBytes": g.dtype_bytes,
            },
            "format": {"layout": f.layout, "blockSize": f.block_size},
            "poolAddress": self.pool_address,
            "numBlocks": self.num_blocks,
            "progressAddress": self.progress_address,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeerInfo:
        g, f = d["geometry"], d["format"]
        return cls(
            name=str(d["name"]),
            metadata=base64.b64decode(d["metadata"]),
            geometry=KvGeometry(int(g["layers"]), int(g["kvHeads"]), int(g["headDim"]), int(g["dtypeBytes"])),
            fmt=BlockFormat(f["layout"], int(f["blockSize"])),
            pool_address=int(d["poolAddress"]),
            num_blocks=int(d["numBlocks"]),
            progress_address=int(d["progressAddress"]),
        )


@dataclass
class Produced:
    """A prompt's KV held for a decode worker to pull."""

    request_id: str
    slot: int
    block_ids: list[int]
    num_tokens: int
    seed: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "requestId": self.request_id,
            "slot": self.slot,
            "blockIds": self.block_ids,
            "numTokens": self.num_tokens,
        }


@dataclass(frozen=True)
class RemoteRequest:
    request_id: str
    slot: int
    block_ids: tuple[int, ...]
    num_tokens: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteRequest:
        return cls(
            str(d["requestId"]), int(d["slot"]), tuple(int(b) for b in d["blockIds"]), int(d["numTokens"])
        )


@dataclass
class PullResult:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    bytes: int
    seconds: float
    translated: bool
    layer_done_at: list[float] = field(default_factory=list)  # monotonic time each layer landed

    def to_dict(self) -> dict[str, Any]:
        return {
            "requestId": self.request_id,
            "blockIds": self.block_ids,
            "numTokens": self.num_tokens,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "translated": self.translated,
        }


@dataclass
class _PullJob:
    peer: PeerInfo
    agent: str
    remote: RemoteRequest
    remote_ids: list[int]
    local_ids: list[int]
    translate: bool
    deadline: float
    done_at: list[float] = field(default_factory=list)
    inflight: deque[tuple[range, Transfer]] = field(default_factory=deque)  # READs posted, not landed


class BlockAllocator:
    """Block ids of the pool; hands out contiguous runs when it can (fewer, larger transfer regions)."""

    def __init__(self, num_blocks: int) -> None:
        self._free = np.ones(num_blocks, dtype=bool)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return int(self._free.sum())

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            free = np.flatnonzero(self._free)
            if len(free) < n:
                raise OutOfBlocks(f"{n} blocks asked, {len(free)} free")
            if n == 0:
                return []
            # first contiguous run of n free blocks, if any
            ends = np.flatnonzero(free[n - 1 :] - free[: len(free) - n + 1] == n - 1)
            chosen = (
                list(range(int(free[ends[0]]), int(free[ends[0]]) + n)) if len(ends) else free[:n].tolist()
            )
            self._free[chosen] = False
            return [int(b) for b in chosen]

    def free(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._free[list(ids)] = True


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive ids as (start, count) runs: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    out: list[tuple[int, int]] = []
    for b in ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def paired_regions(
    local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]
) -> tuple[list[Region], list[Region]]:
    """Split two region lists of equal total length at each other's boundaries, so pairs match in size."""
    lo: list[Region] = []
    re_: list[Region] = []
    i = j = 0
    la, ln = local[0] if local else (0, 0)
    ra, rn = remote[0] if remote else (0, 0)
    while i < len(local) and j < len(remote):
        n = min(ln, rn)
        lo.append((la, n))
        re_.append((ra, n))
        la, ln, ra, rn = la + n, ln - n, ra + n, rn - n
        if ln == 0:
            i += 1
            if i < len(local):
                la, ln = local[i]
        if rn == 0:
            j += 1
            if j < len(remote):
                ra, rn = remote[j]
    return lo, re_


Observer = Callable[[str, dict[str, Any]], None]


class KvSidecar:
    """One worker's KV-transfer agent. Thread-safe: pulls and produces run on worker threads."""

    def __init__(
        self, config: SidecarConfig, transport: KvTransport, observer: Observer | None = None
    ) -> None:
        self.config = config
        self.transport = transport
        self.observer = observer or (lambda _event, _data: None)
        g, f = config.geometry, config.fmt
        self.block_bytes = f.block_bytes(g)
        self._pool_flat: Bytes = np.zeros(g.layers * config.num_blocks * self.block_bytes, dtype=np.uint8)
        self.pool = self._pool_flat.reshape(g.layers, config.num_blocks, self.block_bytes)
        self.progress = np.zeros(config.slots, dtype=np.uint64)
        self._scratch = np.zeros(64, dtype=np.uint64)  # where pulls read a peer's progress word
        self._staging = np.zeros(2 * config.staging_bytes, dtype=np.uint8)
        for buffer in (
            self._pool_flat,
            self.progress.view(np.uint8),
            self._scratch.view(np.uint8),
            self._staging,
        ):
            transport.register(buffer)
        self.blocks = BlockAllocator(config.num_blocks)
        self._lock = threading.Lock()
        self._staging_lock = threading.Lock()
        self._free_slots = list(range(config.slots))
        self._free_scratch = list(range(len(self._scratch)))
        self.produced: dict[str, Produced] = {}
        self.pulled: dict[str, list[int]] = {}
        self._peers: dict[str, str] = {}  # peer name -> NIXL agent name

    # ------------------------------------------------------------------------------ description

    def info(self) -> PeerInfo:
        return PeerInfo(
            name=self.config.name,
            metadata=self.transport.metadata(),
            geometry=self.config.geometry,
            fmt=self.config.fmt,
            pool_address=int(self._pool_flat.ctypes.data),
            num_blocks=self.config.num_blocks,
            progress_address=int(self.progress.ctypes.data),
        )

    def connect(self, peer: PeerInfo) -> str:
        with self._lock:
            agent = self._peers.get(peer.name)
        if agent is None:
            agent = self.transport.add_peer(peer.metadata)
            with self._lock:
                self._peers[peer.name] = agent
        return agent

    # -------------------------------------------------------------------------------- prefill side

    def produce(self, request_id: str, num_tokens: int, *, seed: int | None = None) -> Produced:
        """Reserve blocks and a progress slot for a prompt's KV (layers are written by `write_layer`)."""
        with self._lock:
            if request_id in self.produced:
                return self.produced[request_id]
            if not self._free_slots:
                raise OutOfBlocks("no free produce slot")
            slot = self._free_slots.pop(0)
        try:
            ids = self.blocks.allocate(self.config.fmt.blocks_for(num_tokens))
        except OutOfBlocks:
            with self._lock:
                self._free_slots.append(slot)
            raise
        self.progress[slot] = 0
        record = Produced(
            request_id,
            slot,
            ids,
            num_tokens,
            seed if seed is not None else _seed(request_id),
            time.monotonic(),
        )
        with self._lock:
            self.produced[request_id] = record
        return record

    def write_layer(self, record: Produced, layer: int, tokens: npt.NDArray[Any] | None = None) -> None:
        """Store one layer's KV (canonical ``[2, tokens, heads, dim]`` words; default: the request's
        deterministic pattern) and publish it: the progress word moves only after the bytes are in."""
        from tandem.sidecar.layout import from_tokens

        g = self.config.geometry
        if tokens is None:
            tokens = pattern_tokens(record.seed, layer, g, record.num_tokens)
        (start, count), *rest = runs(record.block_ids)
        if not rest:
            from_tokens(tokens, self.config.fmt, g, self.pool[layer, start : start + count])
        else:
            tmp = np.zeros((len(record.block_ids), self.block_bytes), dtype=np.uint8)
            from_tokens(tokens, self.config.fmt, g, tmp)
            self.pool[layer, record.block_ids] = tmp
        self.progress[record.slot] = layer + 1

    def fill(self, record: Produced, *, layer_seconds: float = 0.0) -> None:
        """Write every layer of the pattern, pacing them like a prefill computing one layer at a time."""
        start = time.monotonic()
        for layer in range(self.config.geometry.layers):
            if layer_seconds:
                delay = start + (layer + 1) * layer_seconds - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.write_layer(record, layer)

    def release(self, request_id: str) -> bool:
        with self._lock:
            record = self.produced.pop(request_id, None)
            local = self.pulled.pop(request_id, None)
            if record is not None:
                self._free_slots.append(record.slot)
        if record is not None:
            self.progress[record.slot] = 0
            self.blocks.free(record.block_ids)
        if local is not None:
            self.blocks.free(local)
        return record is not None or local is not None

    def handle_notifications(self) -> int:
        """Free produced requests whose decode side said ``done:<request id>``."""
        freed = 0
        for messages in self.transport.take_notifications().values():
            for message in messages:
                if not message.startswith(b"done:"):
                    continue
                record = self.produced.get(message[5:].decode())
                if record is not None and self.release(record.request_id):
                    freed += 1
                    served = self.config.geometry.layers * len(record.block_ids) * self.block_bytes
                    self.observer("serve", {"bytes": served})
        return freed

    # --------------------------------------------------------------------------------- decode side

    @contextmanager
    def _scratch_word(self) -> Iterator[int]:
        with self._lock:
            if not self._free_scratch:
                raise SidecarError("too many concurrent pulls")
            index = self._free_scratch.pop()
        try:
            yield index
        finally:
            with self._lock:
                self._free_scratch.append(index)

    def _remote_progress(self, agent: str, peer: PeerInfo, slot: int, index: int) -> int:
        local = [(int(self._scratch.ctypes.data) + 8 * index, 8)]
        remote = [(peer.progress_address + 8 * slot, 8)]
        wait(self.transport.read(agent, local, remote))
        return int(self._scratch[index])

    def pull(self, peer: PeerInfo, remote: RemoteRequest, *, timeout: float = 120.0) -> PullResult:
        """Read a prompt's KV from ``peer`` layer by layer into new local blocks, translating the
        block format when the peer's differs; returns when the last layer is in place.

        Each layer is read as soon as the peer's progress word says it exists, layers ready together
        in one READ; up to `WINDOW` READs are in flight at once (two when translating: one per
        staging buffer)."""
        g = self.config.geometry
        if peer.geometry != g:
            raise SidecarError(f"peer {peer.name} has KV geometry {peer.geometry}, this sidecar {g}")
        agent = self.connect(peer)
        n_remote = peer.fmt.blocks_for(remote.num_tokens)
        if len(remote.block_ids) < n_remote:
            raise SidecarError(
                f"{remote.num_tokens} tokens need {n_remote} remote blocks, got {len(remote.block_ids)}"
            )
        job = _PullJob(
            peer=peer,
            agent=agent,
            remote=remote,
            remote_ids=list(remote.block_ids[:n_remote]),
            local_ids=[],
            translate=peer.fmt != self.config.fmt,
            deadline=time.monotonic() + timeout,
        )
        if job.translate and n_remote * peer.fmt.block_bytes(g) > self.config.staging_bytes:
            raise SidecarError(
                f"one layer is {n_remote * peer.fmt.block_bytes(g)} bytes, "
                f"more than the {self.config.staging_bytes}-byte staging buffer"
            )
        job.local_ids = self.blocks.allocate(self.config.fmt.blocks_for(remote.num_tokens))
        start = time.monotonic()
        try:
            with self._scratch_word() as word, self._maybe(self._staging_lock, job.translate):
                try:
                    self._pull_layers(job, word)
                except (SidecarError, TransportError):
                    # READs already posted may still write into the blocks (and the staging
                    # buffer, whose lock is held until here): wait them out before freeing
                    if not self._settle(job):
                        self._strand(job)
                    raise
            self.transport.notify(agent, b"done:" + remote.request_id.encode())
        except (SidecarError, TransportError):
            self.blocks.free(job.local_ids)
            raise
        seconds = time.monotonic() - start
        with self._lock:
            self.pulled[remote.request_id] = job.local_ids
        nbytes = g.layers * n_remote * peer.fmt.block_bytes(g)
        result = PullResult(
            remote.request_id, job.local_ids, remote.num_tokens, nbytes, seconds, job.translate, job.done_at
        )
        self.observer("pull", {"bytes": nbytes, "seconds": seconds, "translated": job.translate})
        return result

    WINDOW = 4
    COALESCE = 8
    SETTLE_SECONDS = 10.0

    def _settle(self, job: _PullJob) -> bool:
        """Wait up to `SETTLE_SECONDS` for the READs of a failed pull to end (done or failed);
        whether none of them can still write into its blocks."""
        deadline = time.monotonic() + self.SETTLE_SECONDS
        while job.inflight:
            try:
                if not job.inflight[0][1].done():
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.001)
                    continue
            except TransportError:
                pass  # it failed: it writes no more
            job.inflight.popleft()
        return True

    def _strand(self, job: _PullJob) -> None:
        """A failed pull's READs did not end: its blocks stay allocated (never handed to another
        request while a READ may still land in them), and the observer hears of it."""
        log.error(
            "pull of %s from %s: %d READs did not end after the failure; %d blocks withheld",
            job.remote.request_id,
            job.peer.name,
            len(job.inflight),
            len(job.local_ids),
        )
        self.observer("stranded", {"blocks": len(job.local_ids)})
        job.local_ids = []

    def _pull_layers(self, job: _PullJob, word: int) -> None:
        """Read every layer of ``job``, each once the peer's progress word says it exists. Layers
        that are ready together go in one READ (up to `COALESCE` of them; one at a time when
        translating, a layer per staging buffer): a READ has a fixed cost (posting, completion,
        polling), and a pull that fell behind the prefill, or started after it, catches up in
        fewer, larger ones."""
        layers = self.config.geometry.layers
        window = 2 if job.translate else self.WINDOW
        batch = 1 if job.translate else self.COALESCE
        inflight = job.inflight
        known = 0
        layer = 0
        while layer < layers:
            polls = 0
            while known <= layer:
                # Layers in flight: finish the oldest instead of polling (each poll is a round trip
                # on the same link), which also gives the prefill time to publish more layers.
                if inflight:
                    self._land(job, *inflight.popleft())
                elif polls:
                    if time.monotonic() > job.deadline:
                        raise SidecarError(f"peer {job.peer.name} did not produce layer {layer} in time")
                    time.sleep(0.0001)
                known = self._remote_progress(job.agent, job.peer, job.remote.slot, word)
                polls += 1
            if len(inflight) == window:
                self._land(job, *inflight.popleft())
            span = range(layer, min(known, layer + batch, layers))
            lo: list[Region] = []
            ro: list[Region] = []
            for each in span:
                a, b = self._layer_regions(job, each)
                lo += a
                ro += b
            inflight.append((span, self.transport.read(job.agent, lo, ro)))
            layer = span.stop
        while inflight:
            self._land(job, *inflight.popleft())

    def _layer_regions(self, job: _PullJob, layer: int) -> tuple[list[Region], list[Region]]:
        rbb = job.peer.fmt.block_bytes(self.config.geometry)
        remote_regions = [(job.peer.block_address(layer, s), c * rbb) for s, c in runs(job.remote_ids)]
        if job.translate:
            base = int(self._staging.ctypes.data) + (layer % 2) * self.config.staging_bytes
            local_regions = [(base, len(job.remote_ids) * rbb)]
        else:
            pool = int(self._pool_flat.ctypes.data)
            local_regions = [
                (pool + (layer * self.config.num_blocks + s) * rbb, c * rbb) for s, c in runs(job.local_ids)
            ]
        return paired_regions(local_regions, remote_regions)

    def _land(self, job: _PullJob, span: range, transfer: Transfer) -> None:
        wait(transfer, timeout=max(1.0, job.deadline - time.monotonic()))
        for layer in span:
            if job.translate:
                self._translate(
                    layer, job.peer.fmt, len(job.remote_ids), job.remote.num_tokens, job.local_ids
                )
            job.done_at.append(time.monotonic())

    @contextmanager
    def _maybe(self, lock: threading.Lock, take: bool) -> Iterator[None]:
        if take:
            with lock:
                yield
        else:
            yield

    def _translate(
        self, layer: int, src_fmt: BlockFormat, n_remote: int, num_tokens: int, local_ids: list[int]
    ) -> None:
        rbb = src_fmt.block_bytes(self.config.geometry)
        off = (layer % 2) * self.config.staging_bytes
        src = self._staging[off : off + n_remote * rbb].reshape(n_remote, rbb)
        (start, count), *rest = runs(local_ids)
        if not rest:
            translate_blocks(
                src,
                src_fmt,
                self.config.fmt,
                self.config.geometry,
                num_tokens,
                self.pool[layer, start : start + count],
            )
        else:
            tmp = np.zeros((len(local_ids), self.block_bytes), dtype=np.uint8)
            translate_blocks(src, src_fmt, self.config.fmt, self.config.geometry, num_tokens, tmp)
            self.pool[layer, local_ids] = tmp

    def read_tokens(self, block_ids: Sequence[int], layer: int, num_tokens: int) -> npt.NDArray[Any]:
        """One layer of a request as canonical ``[2, tokens, heads, dim]`` words (for checks)."""
        return to_tokens(self.pool[layer, list(block_ids)], self.config.fmt, self.config.geometry, num_tokens)

    def probe_bandwidth(self, peer: PeerInfo, nbytes: int = 8 * MiB) -> float:
        """Bytes per second of one READ of ``nbytes`` from the peer's pool into staging."""
        agent = self.connect(peer)
        nbytes = min(
            nbytes,
            self.config.staging_bytes,
            peer.num_blocks * peer.geometry.layers * peer.fmt.block_bytes(peer.geometry),
        )
        with self._staging_lock:
            start = time.monotonic()
            wait(
                self.transport.read(
                    agent, [(int(self._staging.ctypes.data), nbytes)], [(peer.pool_address, nbytes)]
                )
            )
            seconds = time.monotonic() - start
        return nbytes / seconds if seconds > 0 else 0.0


def _seed(request_id: str) -> int:
    import zlib

    return zlib.crc32(request_id.encode())
