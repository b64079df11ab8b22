"""What fabric the sidecar really runs on: RDMA devices present, the transports UCX selected.

UCX decides per peer which transport carries each lane (RMA, active messages) and prints the
choice at ``UCX_LOG_LEVEL=info``::

    ucp_worker.c:1997 UCX  INFO    B intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)
    ucp_worker.c:1997 UCX  INFO    B inter-node cfg#2 rma_bw(rc_mlx5/mlx5_0:1) am(rc_mlx5/mlx5_0:1)

That line alone cannot say what carries a bulk READ: UCX folds the bandwidth lanes (``rma_bw``,
``am_bw``) into ``am(...)``, and ``rma_am(tcp/lo)`` names only the lane small RMA is emulated on. In
the first line above, a READ is in fact a single-copy CMA ``process_vm_readv`` (``cma/memory``),
not TCP. With ``UCX_PROTO_INFO=y`` UCX also prints, per endpoint configuration, the protocol each
operation uses by message size::

    | B intra-node cfg#1                                               |
    | remote memory read by ucp_get*(multi) into host memory from host |
    | 0..inf | zero-copy   | cma/memory                                |

`ProtoInfoParser` reads those tables; the transports of a configuration's ``remote memory read``
rows (the NIXL READ the sidecar pulls with) then decide its data transport, the lane line only
when no table was printed. `UcxLogTap` reads both from the process's own stdout (UCX logs to fd 1
from C, so the tap swaps fd 1 for a pipe and forwards every byte) and `classify_lanes` turns them
into the ``rdma | tcp | shm`` the sidecar reports. Parsing is pure and tested on recorded lines.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Transport = Literal["rdma", "tcp", "shm", "none"]

_CFG = re.compile(r"UCX\s+INFO\s+(?P<worker>\S+)\s+(?P<peer>[\w-]+)\s+cfg#(?P<cfg>\d+)\s+(?P<lanes>.*)$")
_LANE = re.compile(r"(?P<kind>[a-z_]+)\((?P<tls>[^)]*)\)")
# UCX_PROTO_INFO tables: "| <worker> <peer> cfg#<n> |", "| remote memory read by ucp_get* ... |",
# then rows "| <range> | <description> | <config> |" (config names transports as ``tl/device``)
_TABLE_CELLS = re.compile(r"\|(.*)\|\s*$")
_TABLE_RULE = re.compile(r"\+-[-+]*\+\s*$")
_TABLE_CFG = re.compile(r"^\s*(?P<worker>\S+)\s+(?P<peer>[\w-]+)\s+cfg#(?P<cfg>\d+)\s*$")
_UCX_CHATTER = re.compile(r"\[[\d.]+\]\s+\[[^\]]+\]\s+(\||\+-|.*\bUCX\s+INFO\b)")
_TL_DEV = re.compile(r"\b([a-z][a-z0-9_]*/[\w:.\-]+)")

_RDMA_TLS = ("rc", "dc", "ud", "ib", "mlx5", "verbs", "efa", "srd", "gga")
_SHM_TLS = ("cma", "sysv", "posix", "xpmem", "knem", "self", "cuda_ipc", "rocm_ipc", "ze_ipc")


def classify_tl(tl: str) -> Transport:
    """``rc_mlx5/mlx5_0:1`` -> rdma, ``tcp/eth0`` -> tcp, ``cma/memory`` -> shm."""
    name = tl.split("/", 1)[0]
    if name == "tcp":
        return "tcp"
    if name in _SHM_TLS:
        return "shm"
    if any(name == t or name.startswith(t + "_") for t in _RDMA_TLS):
        return "rdma"
    return "none"


_SLOWEST_FIRST: tuple[Transport, ...] = ("tcp", "rdma", "shm")


@dataclass(frozen=True)
class LaneConfig:
    worker: str
    peer: str  # self | intra-node | inter-node
    lanes: dict[str, tuple[str, ...]]  # lane kind (rma_bw, rma_am, am, ...) -> transports
    cfg: int = -1  # UCX's endpoint configuration index (cfg#N)
    read_tls: tuple[str, ...] = ()  # what a READ uses, from UCX_PROTO_INFO (empty: not printed)

    @property
    def data_transport(self) -> Transport:
        """What carries a bulk READ: the transports of UCX's read protocol when it printed them (the
        slowest class among them, so TCP anywhere in the READ path reports tcp); else, from the lane
        line, the ``rma_bw`` lane if UCX named one, else the lane RMA is emulated on."""
        if self.read_tls:
            classes = {classify_tl(tl) for tl in self.read_tls}
            for cls in _SLOWEST_FIRST:
                if cls in classes:
                    return cls
        for kind in ("rma_bw", "rma", "rma_am", "am_bw", "am"):
            for tl in self.lanes.get(kind, ()):
                cls = classify_tl(tl)
                if cls != "none":
                    return cls
        return "none"


def parse_ucx_line(line: str) -> LaneConfig | None:
    match = _CFG.search(line)
    if match is None:
        return None
    lanes: dict[str, tuple[str, ...]] = {}
    for lane in _LANE.finditer(match["lanes"]):
        lanes[lane["kind"]] = tuple(lane["tls"].split())
    return LaneConfig(worker=match["worker"], peer=match["peer"], lanes=lanes, cfg=int(match["cfg"]))


@dataclass(frozen=True)
class ReadProtocol:
    """The transports UCX uses for a READ on one endpoint configuration (from UCX_PROTO_INFO)."""

    worker: str
    peer: str
    cfg: int
    tls: tuple[str, ...]


class ProtoInfoParser:
    """Reads ``UCX_PROTO_INFO=y`` tables line by line; `feed` returns a `ReadProtocol` at the end of
    each ``remote memory read`` table (its rows' transports, every message size)."""

    def __init__(self) -> None:
        self._cfg: tuple[str, str, int] | None = None
        self._reading = False
        self._tls: list[str] = []

    def feed(self, line: str) -> ReadProtocol | None:
        if _TABLE_RULE.search(line):
            return None
        cells = _TABLE_CELLS.search(line)
        if cells is None:  # anything else ends a table
            return self._finish()
        parts = [c.strip() for c in cells.group(1).split("|")]
        if len(parts) == 1:
            cfg = _TABLE_CFG.match(parts[0])
            if cfg is not None:  # a new table starts
                done = self._finish()
                self._cfg = (cfg["worker"], cfg["peer"], int(cfg["cfg"]))
                return done
            if self._cfg is not None and parts[0].startswith("remote memory read"):
                self._reading = True
            return None
        if self._reading and len(parts) >= 3 and parts[0] != "Range":
            self._tls += [tl for tl in _TL_DEV.findall(parts[-1]) if tl not in self._tls]
        return None

    def _finish(self) -> ReadProtocol | None:
        done = None
        if self._cfg is not None and self._reading and self._tls:
            done = ReadProtocol(*self._cfg, tuple(self._tls))
        self._cfg, self._reading, self._tls = None, False, []
        return done


def with_read_protocol(configs: list[LaneConfig], proto: ReadProtocol) -> list[LaneConfig]:
    """``configs`` with ``proto`` attached to the lane configuration it describes (the newest one of
    the same worker, peer kind and index; a new entry if UCX printed no lane line for it)."""
    for i in range(len(configs) - 1, -1, -1):
        c = configs[i]
        if (c.worker, c.peer, c.cfg) == (proto.worker, proto.peer, proto.cfg):
            return [*configs[:i], replace(c, read_tls=proto.tls), *configs[i + 1 :]]
    return [*configs, LaneConfig(proto.worker, proto.peer, {}, proto.cfg, proto.tls)]


def classify_lanes(configs: list[LaneConfig], *, exclude_self: bool = True) -> Transport:
    """The transport peers see: the newest non-self configuration UCX printed its READ protocol
    for (an endpoint this process pulls on), else the newest non-self configuration at all (a
    serving side's endpoints never READ, so only their lane line is known)."""
    peers = [c for c in configs if not (exclude_self and c.peer == "self")]
    for cfg in reversed(peers):
        if cfg.read_tls:
            return cfg.data_transport
    return peers[-1].data_transport if peers else "none"


def rdma_devices(sysfs: Path = Path("/sys/class/infiniband")) -> list[str]:
    """RDMA devices the container can see (the RDMA device plugin mounts them)."""
    try:
        return sorted(p.name for p in sysfs.iterdir())
    except OSError:
        return []


def allowed_transports(ucx_tls: str | None) -> list[str]:
    """``UCX_TLS`` as a list (``None``/empty: UCX picks from everything it finds)."""
    if not ucx_tls:
        return []
    return [t for t in ucx_tls.replace(" ", "").split(",") if t]


@dataclass
class FabricReport:
    """The probe's findings; what ``/readyz`` and the ``tandem_kv_transport`` gauge are made of."""

    expected: Literal["rdma", "tcp"]
    allow_tcp_fallback: bool
    rdma_devices: list[str] = field(default_factory=list)
    ucx_tls: list[str] = field(default_factory=list)
    selected: Transport = "none"
    lanes: list[LaneConfig] = field(default_factory=list)

    def effective(self) -> Transport:
        """What runs: UCX's selection once a peer was reached, else what the devices allow."""
        if self.selected != "none":
            return self.selected
        if self.rdma_devices and (not self.ucx_tls or any(classify_tl(t) == "rdma" for t in self.ucx_tls)):
            return "rdma"
        return "tcp"

    def fallback_problem(self) -> str | None:
        """Why the fabric is not acceptable (TCP where RDMA was asked for), or None."""
        if self.expected != "rdma" or self.allow_tcp_fallback:
            return None
        now = self.effective()
        if now == "rdma" or now == "shm":
            return None
        if not self.rdma_devices:
            return "RDMA was requested but the sidecar sees no RDMA device (/sys/class/infiniband is empty)"
        return f"RDMA was requested but UCX selected {now} for the KV transfer"


def enable_ucx_selection_log(environ: dict[str, str] | None = None) -> None:
    """Ask UCX (before NIXL loads it) for what the tap reads: the lane line (``UCX_LOG_LEVEL=info``)
    and the protocol tables (``UCX_PROTO_INFO=y``); settings already made are kept."""
    env = os.environ if environ is None else environ
    env.setdefault("UCX_LOG_LEVEL", "info")
    env.setdefault("UCX_PROTO_INFO", "y")


class UcxLogTap:
    """Forwards one of the process's file descriptors (UCX logs to stdout unless ``UCX_LOG_FILE``
    says otherwise) through a pipe, keeping UCX's lane-selection lines and READ protocol tables.
    ``echo=False`` keeps UCX's informational lines and tables off the terminal (the tap still reads
    them); everything else, UCX's warnings and errors included, is forwarded either way."""

    def __init__(self, fd: int = 1, *, echo: bool = True) -> None:
        self.configs: list[LaneConfig] = []
        self.echo = echo
        self._fd = fd
        self._lock = threading.Lock()
        self._proto = ProtoInfoParser()
        self._read_fd, write_fd = os.pipe()
        self._saved = os.dup(fd)
        os.dup2(write_fd, fd)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, name="ucx-log-tap", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._read_fd, 65536)
            if not chunk:
                return
            if self.echo:
                os.write(self._saved, chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                self._line(line)
                if not self.echo and not _UCX_CHATTER.match(line):
                    os.write(self._saved, raw + b"\n")

    def _line(self, line: str) -> None:
        cfg = parse_ucx_line(line)
        proto = self._proto.feed(line)
        with self._lock:
            if proto is not None:
                self.configs = with_read_protocol(self.configs, proto)
            if cfg is not None:
                self.configs.append(cfg)
            del self.configs[:-64]

    def close(self) -> None:
        """Give the file descriptor back (what UCX writes afterwards is no longer read)."""
        os.dup2(self._saved, self._fd)  # closes the pipe's write end: the pump sees EOF
        self._thread.join(timeout=5)
        os.close(self._saved)
        os.close(self._read_fd)

    def snapshot(self) -> list[LaneConfig]:
        with self._lock:
            return list(self.configs)
