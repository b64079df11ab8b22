"""Ask not-ready KV sidecars why (I/O): ``GET http://<pod IP>:8200/readyz``.

A sidecar whose RDMA fell back to TCP fails its readiness probe, and pod status says only "not
ready". Its ``/readyz`` answer names the transport it runs (503 with ``"reason": "TcpFallback"``,
``"transport": "tcp"``), which is what lets ``KVTransferReady`` say ``TcpFallback`` instead of
``SidecarNotReady`` (`tandem.kv_status`). Only sidecars that pod status calls not ready are asked,
at most ``limit`` at a time, each within ``timeout_s``; a pod that cannot be reached (an operator
outside the pod network, a NetworkPolicy) is simply not known, as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from tandem.builders.kv import SIDECAR_PORT
from tandem.kv_status import sidecar_ready
from tandem.names import LABEL_ROLE

Answer = tuple[int | None, dict[str, Any] | None]  # (HTTP status or None: unreachable, JSON body)


def to_ask(pods: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Pod name -> its sidecar's /readyz URL, for the live prefill and decode pods (their role
    label: the ends of a KV transfer) whose sidecar is not ready and whose IP is known."""
    out = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        ip = (pod.get("status") or {}).get("podIP")
        role = (meta.get("labels") or {}).get(LABEL_ROLE)
        if meta.get("deletionTimestamp") or not ip or role not in ("prefill", "decode"):
            continue
        if sidecar_ready(pod):
            continue
        host = f"[{ip}]" if ":" in ip else ip
        out[str(meta["name"])] = f"http://{host}:{SIDECAR_PORT}/readyz"
    return out


async def ask(urls: Mapping[str, str], *, timeout_s: float = 1.0, limit: int = 8) -> dict[str, Answer]:
    """Pod name -> (status, body) of one GET of each URL; (None, None) when it did not answer."""
    if not urls:
        return {}
    gate = asyncio.Semaphore(limit)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, url: str) -> Answer:
        async with gate:
            try:
                async with session.get(url) as resp:
                    text = await resp.text()
                    try:
                        body = json.loads(text)
                    except ValueError:
                        body = None
                    return resp.status, body if isinstance(body, dict) else None
            except (TimeoutError, aiohttp.ClientError, OSError):
                return None, None

    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(*(one(session, url) for url in urls.values()))
    return dict(zip(urls, answers, strict=True))
