"""A `KvFetcher` that moves real bytes: the decode worker asks its KV-transfer sidecar to pull.

Selected with ``--kv-sidecar URL`` (env ``TANDEM_SIM_KV_SIDECAR``). The decode worker's sidecar reads
the prompt's KV layer by layer from the prefill worker's sidecar, which listens on the prefill pod's
IP (``remote_host`` of the ``kv_transfer_params``) at the sidecar port. The simulated prefill runs
no model, so its sidecar writes the prompt's KV (a deterministic pattern of the right size) when
the decode side first asks for it; the bytes then cross the fabric like a real engine's would.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tandem.sim.worker_engine import KvFetch

SIDECAR_PORT = 8200  # tandem.builders.kv.SIDECAR_PORT (the sim does not import the builders)


class KvFetchFailed(RuntimeError):
    pass


class SidecarKvFetcher:
    """`KvFetcher` through the local sidecar's ``POST /v1/kv/pull``; raises so the engine recomputes."""

    def __init__(
        self, sidecar_url: str, *, peer_port: int = SIDECAR_PORT, timeout: float = 120.0, verify: bool = False
    ) -> None:
        self.sidecar_url = sidecar_url.rstrip("/")
        self.verify = verify  # have the sidecar check the bytes against the simulated prefill's pattern
        self.peer_port = peer_port
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.last_result: dict[str, Any] | None = None

    def peer_url(self, params: dict[str, Any]) -> str:
        explicit = params.get("tandem_kv_sidecar")
        if explicit:
            return str(explicit).rstrip("/")
        host = params.get("remote_host")
        if not host:
            raise KvFetchFailed("kv_transfer_params carry no remote_host")
        return f"http://{host}:{self.peer_port}"

    async def fetch(self, fetch: KvFetch) -> None:
        params = dict(fetch.params)
        body = {
            "peer": self.peer_url(params),
            "requestId": str(params.get("remote_request_id") or fetch.request_id),
            "numTokens": fetch.num_tokens,
            "verify": self.verify,
        }
        async with (
            aiohttp.ClientSession(timeout=self.timeout) as session,
            session.post(f"{self.sidecar_url}/v1/kv/pull", json=body) as resp,
        ):
            result = await resp.json()
            if resp.status != 200:
                raise KvFetchFailed(f"sidecar pull failed ({resp.status}): {result.get('error')}")
            if self.verify and not result.get("verified"):
                raise KvFetchFailed(
                    f"the KV pulled for {body['requestId']} differs from what the prefill wrote"
                )
        self.last_result = result
