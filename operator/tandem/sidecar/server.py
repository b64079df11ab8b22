"""The sidecar's HTTP surface (aiohttp): probes, metrics, and the control API the engine calls.

Endpoints (contract in ``worker-images/kv-sidecar/README.md``)::

    GET  /livez                      200 while the process runs
    GET  /readyz                     200 when NIXL is up and the fabric is acceptable, else 503 + reason
    GET  /metrics                    Prometheus text
    GET  /v1/info                    this agent: NIXL metadata, KV geometry, block format, fabric report
    POST /v1/kv/produce              {requestId, numTokens, layerSeconds?} reserve + write a prompt's KV
    GET  /v1/kv/{requestId}          a produced request ({slot, blockIds, numTokens}); with
                                     ?numTokens=N a simulated prefill materialises it on demand
    POST /v1/kv/pull                 {peer, requestId, numTokens, verify?} pull a prompt's KV from peer
    POST /v1/kv/{requestId}/release  free a request's blocks (either side)
    GET  /v1/probe?peer=URL          one bandwidth probe to a peer
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tandem.sidecar.core import KvSidecar, OutOfBlocks, PeerInfo, RemoteRequest, SidecarError
from tandem.sidecar.layout import pattern_tokens
from tandem.sidecar.probe import FabricReport, UcxLogTap, classify_lanes
from tandem.sidecar.transport import TransportError

logger = logging.getLogger("tandem.sidecar")

TRANSPORTS = ("rdma", "tcp", "shm")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes = Counter(
            "tandem_kv_transfer_bytes", "KV bytes moved by this sidecar.", ["direction"], registry=r
        )
        self.seconds = Histogram(
            "tandem_kv_transfer_seconds", "Time to pull one prompt's KV.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.failures = Counter(
            "tandem_kv_transfer_failures", "KV pulls that failed.", ["reason"], registry=r
        )
        self.transport = Gauge(
            "tandem_kv_transport", "1 for the transport the KV transfer runs on.", ["transport"], registry=r
        )
        self.bandwidth = Gauge(
            "tandem_kv_peer_bandwidth_bytes_per_second",
            "Last bandwidth probe to a peer.",
            ["peer"],
            registry=r,
        )
        self.rdma_devices = Gauge(
            "tandem_kv_rdma_devices", "RDMA devices visible to the sidecar.", registry=r
        )
        self.ready = Gauge("tandem_kv_ready", "1 when /readyz answers 200.", registry=r)
        self.blocks_free = Gauge("tandem_kv_blocks_free", "Free blocks of the host KV pool.", registry=r)
        for t in TRANSPORTS:
            self.transport.labels(t).set(0)
        self.bytes.labels("pull")
        self.bytes.labels("serve")


@dataclass
class ServerSettings:
    produced_ttl_seconds: float = 120.0
    probe_interval_seconds: float = 30.0
    notification_interval_seconds: float = 0.02


class SidecarServer:
    def __init__(
        self,
        sidecar: KvSidecar,
        fabric: FabricReport,
        *,
        tap: UcxLogTap | None = None,
        settings: ServerSettings | None = None,
    ) -> None:
        self.sidecar = sidecar
        self.fabric = fabric
        self.tap = tap
        self.settings = settings or ServerSettings()
        self.metrics = SidecarMetrics()
        self._peers: dict[str, PeerInfo] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._fills: set[asyncio.Future[None]] = set()
        self._logged_problem: str | None = None
        sidecar.observer = self._observe
        self.refresh_fabric()

    # ------------------------------------------------------------------------------ state

    def _observe(self, event: str, data: Mapping[str, Any]) -> None:
        if event == "pull":
            self.metrics.bytes.labels("pull").inc(float(data["bytes"]))
            self.metrics.seconds.observe(float(data["seconds"]))
        elif event == "serve":  # a peer finished reading a produced request (its "done" notification)
            self.metrics.bytes.labels("serve").inc(float(data["bytes"]))

    def refresh_fabric(self) -> None:
        if self.tap is not None:
            configs = self.tap.snapshot()
            self.fabric.lanes = configs[-8:]
            self.fabric.selected = classify_lanes(configs)
        now = self.fabric.effective()
        for t in TRANSPORTS:
            self.metrics.transport.labels(t).set(1 if t == now else 0)
        self.metrics.rdma_devices.set(len(self.fabric.rdma_devices))
        problem = self.fabric.fallback_problem()
        self.metrics.ready.set(1 if problem is None else 0)
        self.metrics.blocks_free.set(self.sidecar.blocks.num_free)
        if problem != self._logged_problem:  # once per change: `kubectl logs -c kv-sidecar` says why
            if problem is not None:
                logger.warning("Not ready: TcpFallback: %s", problem)
            elif self._logged_problem is not None:
                logger.info("Ready again: the KV transfer runs over %s", now)
            self._logged_problem = problem

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_get("/livez", self.handle_live)
        app.router.add_get("/readyz", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/v1/info", self.handle_info)
        app.router.add_post("/v1/kv/produce", self.handle_produce)
        app.router.add_post("/v1/kv/pull", self.handle_pull)
        app.router.add_get("/v1/kv/{request_id}", self.handle_get)
        app.router.add_post("/v1/kv/{request_id}/release", self.handle_release)
        app.router.add_get("/v1/probe", self.handle_probe)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        self._tasks = [asyncio.create_task(self._housekeeping()), asyncio.create_task(self._probe_loop())]

    async def _stop(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fills:
            await asyncio.gather(*self._fills, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.notification_interval_seconds)
            self.sidecar.handle_notifications()
            cutoff = time.monotonic() - self.settings.produced_ttl_seconds
            for rid, rec in list(self.sidecar.produced.items()):
                if rec.created < cutoff:
                    self.sidecar.release(rid)
            self.refresh_fabric()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_seconds)
            for url in list(self._peers):
                await self._probe(url)

    async def _probe(self, url: str) -> float | None:
        try:
            peer = await self._peer(url)
            bw = await asyncio.to_thread(self.sidecar.probe_bandwidth, peer)
        except (SidecarError, TransportError, aiohttp.ClientError, OSError) as exc:
            logger.warning("Failed to probe KV peer %s: %s", url, exc)
            self._peers.pop(url, None)
            return None
        self.metrics.bandwidth.labels(url).set(bw)
        return bw

    async def _peer(self, url: str, *, refresh: bool = False) -> PeerInfo:
        if refresh or url not in self._peers:
            assert self._session is not None
            async with self._session.get(f"{url}/v1/info") as resp:
                resp.raise_for_status()
                self._peers[url] = PeerInfo.from_dict((await resp.json())["agent"])
        return self._peers[url]

    # --------------------------------------------------------------------------- handlers

    async def handle_live(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def handle_ready(self, _request: web.Request) -> web.Response:
        self.refresh_fabric()
        problem = self.fabric.fallback_problem()
        body = {
            "ready": problem is None,
            "transport": self.fabric.effective(),
            "expected": self.fabric.expected,
        }
        if problem is not None:
            return web.json_response({**body, "reason": "TcpFallback", "message": problem}, status=503)
        return web.json_response(body)

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        self.refresh_fabric()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_info(self, _request: web.Request) -> web.Response:
        f = self.fabric
        return web.json_response(
            {
                "agent": self.sidecar.info().to_dict(),
                "fabric": {
                    "expected": f.expected,
                    "effective": f.effective(),
                    "selected": f.selected,
                    "rdmaDevices": f.rdma_devices,
                    "ucxTls": f.ucx_tls,
                    "lanes": [
                        {
                            "peer": c.peer,
                            "lanes": {k: list(v) for k, v in c.lanes.items()},
                            "read": list(c.read_tls),  # what UCX uses for a READ (UCX_PROTO_INFO)
                        }
                        for c in f.lanes
                    ],
                    "backend": self.sidecar.transport.backend,
                },
                "blocksFree": self.sidecar.blocks.num_free,
            }
        )

    def _start_fill(self, rid: str, num_tokens: int, layer_seconds: float) -> dict[str, Any]:
        record = self.sidecar.produce(rid, num_tokens)
        if self.sidecar.progress[record.slot] == 0:
            fut = asyncio.ensure_future(
                asyncio.to_thread(self.sidecar.fill, record, layer_seconds=layer_seconds)
            )
            self._fills.add(fut)
            fut.add_done_callback(self._fills.discard)
        return record.to_dict()

    async def handle_produce(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            out = self._start_fill(
                str(body["requestId"]), int(body["numTokens"]), float(body.get("layerSeconds", 0))
            )
        except OutOfBlocks as exc:
            return web.json_response({"error": str(exc)}, status=507)
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        return web.json_response(out)

    async def handle_get(self, request: web.Request) -> web.Response:
        rid = request.match_info["request_id"]
        record = self.sidecar.produced.get(rid)
        if record is not None:
            return web.json_response(record.to_dict())
        tokens = request.query.get("numTokens")
        if tokens is None:
            return web.json_response({"error": f"no KV for request {rid}"}, status=404)
        try:
            return web.json_response(self._start_fill(rid, int(tokens), 0.0))
        except OutOfBlocks as exc:
            return web.json_response({"error": str(exc)}, status=507)

    async def handle_pull(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            url = str(body["peer"]).rstrip("/")
            rid = str(body["requestId"])
            tokens = int(body["numTokens"])
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        assert self._session is not None
        try:
            peer = await self._peer(url)
            async with self._session.get(f"{url}/v1/kv/{rid}", params={"numTokens": str(tokens)}) as resp:
                resp.raise_for_status()
                remote = RemoteRequest.from_dict(await resp.json())
            result = await asyncio.to_thread(self.sidecar.pull, peer, remote)
        except (aiohttp.ClientError, OSError) as exc:
            self.metrics.failures.labels("peer").inc()
            self._peers.pop(url, None)
            return web.json_response({"error": f"peer {url}: {exc}"}, status=502)
        except OutOfBlocks as exc:
            self.metrics.failures.labels("no_blocks").inc()
            return web.json_response({"error": str(exc)}, status=507)
        except (SidecarError, TransportError) as exc:
            self.metrics.failures.labels("transfer").inc()
            self._peers.pop(url, None)
            return web.json_response({"error": str(exc)}, status=502)
        out = result.to_dict()
        if body.get("verify"):
            out["verified"] = await asyncio.to_thread(self._verify, result.block_ids, rid, tokens)
        if body.get("release", True):
            self.sidecar.release(rid)
        self.refresh_fabric()
        out["transport"] = self.fabric.effective()
        return web.json_response(out)

    def _verify(self, block_ids: list[int], rid: str, tokens: int) -> bool:
        """Compare a pulled request with the simulated prefill's pattern, layer by layer."""
        from tandem.sidecar.core import _seed

        g = self.sidecar.config.geometry
        seed = _seed(rid)
        return all(
            np.array_equal(
                self.sidecar.read_tokens(block_ids, layer, tokens), pattern_tokens(seed, layer, g, tokens)
            )
            for layer in range(g.layers)
        )

    async def handle_release(self, request: web.Request) -> web.Response:
        released = self.sidecar.release(request.match_info["request_id"])
        return web.json_response({"released": released})

    async def handle_probe(self, request: web.Request) -> web.Response:
        url = request.query.get("peer", "").rstrip("/")
        if not url:
            return web.json_response({"error": "peer is required"}, status=400)
        bw = await self._probe(url)
        if bw is None:
            return web.json_response({"error": f"probe to {url} failed"}, status=502)
        return web.json_response({"peer": url, "bytesPerSecond": bw})
