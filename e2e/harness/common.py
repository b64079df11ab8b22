"""Shared plumbing for the e2e harness: repo paths, the tool binaries, processes and polling.

Everything here binds or connects to 127.0.0.1 only. Processes the harness starts run in their
own session (``start_new_session=True``), so they are stopped by signalling their process group,
never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_ROOT = REPO_ROOT / ".tandem"
BUILD_SCRIPT = REPO_ROOT / "tools" / "build.sh"
K8S_VERSION_FILE = REPO_ROOT / "tools" / "k8s" / "VERSION"

BIN_DIR_ENV = "TANDEM_BIN_DIR"


class HarnessError(RuntimeError):
    """A harness step failed; the message says which and where its logs are."""


def log(message: str) -> None:
    """Prints a progress line to stderr, so stdout stays machine-readable (e.g. `env`)."""
    print(f"harness: {message}", file=sys.stderr, flush=True)


def expected_k8s_version() -> str:
    """The Kubernetes version tools/build.sh builds, e.g. ``v1.36.3``."""
    return K8S_VERSION_FILE.read_text().strip()


def bin_dir() -> Path:
    """Returns the directory holding the built binaries (kube-apiserver, kwokctl, kubectl ...).

    ``$TANDEM_BIN_DIR`` wins; otherwise ``tools/build.sh`` is run, which returns at once when its
    cache is warm and prints the directory as its last stdout line (a cold build takes many
    minutes and is logged to stderr).
    """
    env = os.environ.get(BIN_DIR_ENV)
    if env:
        path = Path(env)
        if not (path / "kube-apiserver").exists():
            raise HarnessError(f"${BIN_DIR_ENV}={env} holds no kube-apiserver")
        return path
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode} (see its stderr)")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise HarnessError(f"{BUILD_SCRIPT} printed no binary directory")
    return Path(lines[-1])


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which is also
    where every outgoing connection (kubectl, httpx, the apiserver's to etcd) takes its local
    port: between this call and the server's own bind, one of them can take it (the CI run saw
    the operator's health endpoint fail with "address already in use"). Below that range only
    servers bind, and none of this process's picks repeats. Not just below it either: kwokctl
    takes its clusters' ports counting down from 32767."""
    top = min(_ephemeral_range()[0], 30000)
    if top > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, top)
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Calls ``probe`` until it returns something other than None/False, or raises TimeoutError.

    Exceptions from the probe count as "not yet"; the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = probe()
        except Exception as exc:
            last_exc = exc
        else:
            if result is not None and result is not False:
                return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}") from last_exc
        time.sleep(interval)


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists; reaps the leader if it is our zombie child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_groups(pgids: list[int], *, timeout: float = 10.0) -> None:
    """SIGTERMs the process groups, then SIGKILLs whichever outlives ``timeout``; all at once.

    Only call this for groups the harness (or kwokctl on its behalf) started.
    """
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pgids)
    while alive and time.monotonic() < deadline:
        alive = [pgid for pgid in alive if group_alive(pgid)]
        if alive:
            time.sleep(0.1)
    for pgid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def stop_process_group(pgid: int, *, timeout: float = 10.0) -> None:
    """SIGTERMs the process group ``pgid``, then SIGKILLs it if it outlives ``timeout``."""
    stop_process_groups([pgid], timeout=timeout)


SIM_MODEL = {"name": "meta-llama/Llama-3.1-8B-Instruct", "preset": "llama-3.1-8b"}


def sim_service(name: str, pools: list[tuple[str, str, str]], **spec: Any) -> dict[str, Any]:
    """An ``engine: sim`` Llama-3.1-8B InferenceService with ``pools`` as (name, role,
    AcceleratorPool) and any further spec fields."""
    return {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": dict(SIM_MODEL),
            "engine": "sim",
            "pools": [{"name": n, "role": r, "acceleratorPool": a} for n, r, a in pools],
            **spec,
        },
    }


def write_result(path: str | Path, result: dict[str, Any]) -> int:
    """A benchmark's result as JSON at ``path`` (and on stdout); the exit code 0."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
