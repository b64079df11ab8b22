"""What fabric the sidecar really runs on: RDMA devices present, the transports UCX selected.

UCX decides per peer which transport carries each lane (RMA, active messages) and prints the
choice at ``UCX_LOG_LEVEL=info``::

    ucp_worker.c:1997 UCX  INFO    B intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)
    ucp_worker.c:1997 UCX  INFO    B inter-node cfg#2 rma_bw(rc_mlx5/mlx5_0:1) am(rc_mlx5/mlx5_0:1)

`UcxLogTap` reads those lines from the process's own stdout (UCX logs to fd 1 from C, so the
tap swaps fd 1 for a pipe and forwards every byte) and `classify_lanes` turns them into the
``rdma | tcp | shm`` the sidecar reports. Parsing is pure and tested on recorded lines.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Transport = Literal["rdma", "tcp", "shm", "none"]

_CFG = re.compile(r"UCX\s+INFO\s+(?P<worker>\S+)\s+(?P<peer>[\w-]+)\s+cfg#(?P<cfg>\d+)\s+(?P<lanes>.*)$")
_LANE = re.compile(r"(?P<kind>[a-z_]+)\((?P<tls>[^)]*)\)")

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


@dataclass(frozen=True)
class LaneConfig:
    worker: str
    peer: str  # self | intra-node | inter-node
    lanes: dict[str, tuple[str, ...]]  # lane kind (rma_bw, rma_am, am, ...) -> transports

    @property
    def data_transport(self) -> Transport:
        """What carries bulk RMA: the ``rma_bw`` lane if UCX has one, else the lane RMA is emulated on."""
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
    return LaneConfig(worker=match["worker"], peer=match["peer"], lanes=lanes)


def classify_lanes(configs: list[LaneConfig], *, exclude_self: bool = True) -> Transport:
    """The transport peers see: the last configuration UCX chose for a non-self endpoint."""
    for cfg in reversed(configs):
        if exclude_self and cfg.peer == "self":
            continue
        return cfg.data_transport
    return "none"


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


class UcxLogTap:
    """Forwards one of the process's file descriptors (UCX logs to stdout unless ``UCX_LOG_FILE``
    says otherwise) through a pipe, keeping UCX's lane-selection lines."""

    def __init__(self, fd: int = 1) -> None:
        self.configs: list[LaneConfig] = []
        self._lock = threading.Lock()
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
            os.write(self._saved, chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                cfg = parse_ucx_line(raw.decode("utf-8", "replace"))
                if cfg is not None:
                    with self._lock:
                        self.configs.append(cfg)
                        del self.configs[:-64]

    def snapshot(self) -> list[LaneConfig]:
        with self._lock:
            return list(self.configs)
