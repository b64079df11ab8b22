"""The transfer engine under the sidecar: a small interface, and NIXL behind it.

The sidecar only needs one-sided READs of registered host memory between named agents, which
is what NIXL gives vLLM and Dynamo. NIXL is optional at import time (the ``kv`` extra): the
package imports, and `load_nixl` says precisely why a sidecar cannot start without it.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Region = tuple[int, int]  # (address, length in bytes)


class TransportError(RuntimeError):
    pass


class Transfer(Protocol):
    def done(self) -> bool:
        """True once complete; raises `TransportError` if it failed."""
        ...


class KvTransport(Protocol):
    """One-sided reads between agents that exchanged metadata out of band."""

    name: str
    backend: str

    def register(self, buffer: npt.NDArray[np.uint8]) -> None: ...

    def metadata(self) -> bytes: ...

    def add_peer(self, metadata: bytes) -> str: ...

    def read(
        self, peer: str, local: Sequence[Region], remote: Sequence[Region], notify: bytes = b""
    ) -> Transfer:
        """Start copying each ``remote`` region of ``peer`` into the matching ``local`` region."""
        ...

    def notify(self, peer: str, message: bytes) -> None: ...

    def take_notifications(self) -> dict[str, list[bytes]]: ...


def load_nixl() -> Any:
    """The NIXL Python API module (``nixl._api``, or the wheel's ``nixl_cu12._api`` / ``nixl_cu13._api``)."""
    errors = []
    for module in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
    raise TransportError(
        "NIXL is not installed (pip install --no-deps nixl-cu12; it needs numpy): " + "; ".join(errors)
    )


class _NixlTransfer:
    def __init__(self, agent: Any, handle: Any) -> None:
        self._agent = agent
        self._handle = handle
        self._done = False

    def done(self) -> bool:
        if self._done:
            return True
        try:
            state = self._agent.check_xfer_state(self._handle)
        except Exception as exc:
            raise TransportError(f"NIXL transfer failed: {exc!r}") from exc
        if state == "DONE":
            self._done = True
            self._agent.release_xfer_handle(self._handle)
            return True
        if state == "ERR":
            self._agent.release_xfer_handle(self._handle)
            raise TransportError("NIXL transfer failed")
        return False


class NixlTransport:
    """A NIXL agent with one backend (UCX by default, LIBFABRIC for EFA-style fabrics), host memory.

    ``threads`` > 0 starts NIXL's thread pool (the backend's ``num_threads``): that many dedicated
    UCX workers, each progressed by its own thread, and a READ of at least ``split_min_bytes`` is
    cut into ``threads * SPLIT_BATCH`` descriptors that NIXL spreads over them. That is what makes a
    same-host pull fast: there UCX reads with CMA (``process_vm_readv``: one CPU copy, made by the
    thread that progresses the request), so one thread copies at about half of ``memcpy`` speed on
    a small host and two come close to it. Over RDMA the NIC copies, and 0 (NIXL's one progress
    thread) stays the default. Small reads (progress words) stay on NIXL's shared worker either way.
    """

    SPLIT_BATCH = 4  # NIXL's split_batch_size: reads of fewer descriptors are not split

    def __init__(
        self,
        name: str,
        backend: str = "UCX",
        *,
        threads: int = 0,
        split_min_bytes: int = 1 << 20,
        params: dict[str, str] | None = None,
    ) -> None:
        api = load_nixl()
        config = api.nixl_agent_config(
            enable_prog_thread=True,
            backends=[],  # created below, with parameters
            # the sidecar posts from worker threads and reads notifications from the event loop
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.name = name
        self.backend = backend
        self.threads = max(0, threads)
        self.split_min_bytes = split_min_bytes
        self._agent = api.nixl_agent(name, config)
        init = dict(params or {})
        if self.threads:
            init.setdefault("num_threads", str(self.threads))
            if backend == "UCX":
                init.setdefault("split_batch_size", str(self.SPLIT_BATCH))
        if backend in self._agent.get_plugin_list():
            try:
                self._agent.create_backend(backend, init)
            except Exception as exc:  # nixlBackendError and friends share no base class
                raise TransportError(f"NIXL backend {backend} did not start with {init}: {exc!r}") from exc
        if backend not in self._agent.backends:
            raise TransportError(
                f"NIXL backend {backend} did not start; plugins present: {self._agent.get_plugin_list()}"
            )
        self._registered: list[Any] = []

    def _split(self, local: Sequence[Region], remote: Sequence[Region]) -> tuple[list[Region], list[Region]]:
        """Cut large pairs so NIXL's thread pool gets ``threads * SPLIT_BATCH`` descriptors to share."""
        total = sum(n for _, n in local)
        want = self.threads * self.SPLIT_BATCH
        if self.threads < 2 or len(local) >= want or total < self.split_min_bytes:
            return list(local), list(remote)
        per = -(-total // want)  # ceil
        piece = -(-per // 4096) * 4096  # whole pages
        lo: list[Region] = []
        ro: list[Region] = []
        for (la, n), (ra, _) in zip(local, remote, strict=True):
            for off in range(0, n, piece):
                k = min(piece, n - off)
                lo.append((la + off, k))
                ro.append((ra + off, k))
        return lo, ro

    def register(self, buffer: npt.NDArray[np.uint8]) -> None:
        self._registered.append(
            self._agent.register_memory([(buffer.ctypes.data, buffer.nbytes, 0, "")], "DRAM", [self.backend])
        )

    def metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        try:
            name = self._agent.add_remote_agent(metadata)
        except Exception as exc:  # NIXL's binding errors (nixlNotFoundError, ...) share no base class
            raise TransportError(f"NIXL could not load the peer's metadata: {exc!r}") from exc
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_peer(self, peer: str) -> None:
        self._agent.remove_remote_agent(peer)

    def read(
        self, peer: str, local: Sequence[Region], remote: Sequence[Region], notify: bytes = b""
    ) -> Transfer:
        if len(local) != len(remote):
            raise ValueError("local and remote region lists differ in length")
        local, remote = self._split(local, remote)
        try:
            local_descs = self._agent.get_xfer_descs([(a, n, 0) for a, n in local], "DRAM")
            remote_descs = self._agent.get_xfer_descs([(a, n, 0) for a, n in remote], "DRAM")
            handle = self._agent.initialize_xfer(
                "READ", local_descs, remote_descs, peer, notify, [self.backend]
            )
            state = self._agent.transfer(handle)
        except Exception as exc:
            raise TransportError(f"NIXL could not post a READ from {peer}: {exc!r}") from exc
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise TransportError(f"NIXL could not post a READ from {peer}")
        return _NixlTransfer(self._agent, handle)

    def notify(self, peer: str, message: bytes) -> None:
        try:
            self._agent.send_notif(peer, message)
        except Exception as exc:
            raise TransportError(f"NIXL could not notify {peer}: {exc!r}") from exc

    def take_notifications(self) -> dict[str, list[bytes]]:
        got: dict[str, list[bytes]] = self._agent.get_new_notifs()
        return got


def wait(transfer: Transfer, *, timeout: float = 60.0, spin: int = 200) -> None:
    """Block until ``transfer`` completes: spin first (a layer takes milliseconds), then yield the CPU."""
    deadline = time.monotonic() + timeout
    n = 0
    while not transfer.done():
        n += 1
        if n > spin:
            time.sleep(0.0001)
            if time.monotonic() > deadline:
                raise TransportError(f"transfer did not complete within {timeout} s")
