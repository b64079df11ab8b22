"""``python -m tandem.sidecar``: the KV-transfer sidecar. Settings: flags, else ``TANDEM_KV_*`` env."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from tandem.sidecar.core import KvSidecar, MiB, SidecarConfig
from tandem.sidecar.layout import BlockFormat, KvGeometry
from tandem.sidecar.probe import (
    FabricReport,
    UcxLogTap,
    allowed_transports,
    enable_ucx_selection_log,
    rdma_devices,
)
from tandem.sidecar.server import ServerSettings, SidecarServer

ENV = "TANDEM_KV_"
DTYPE_BYTES = {
    "fp16": 2,
    "bf16": 2,
    "float16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "fp8_e4m3fn": 1,
    "fp8_e4m3fnuz": 1,
}


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV + name) or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem-kv-sidecar", description="Tandem's KV-transfer sidecar (NIXL).")

    def opt(flag: str, env: str, default: str, help_: str, **kw: Any) -> None:
        p.add_argument(flag, default=_env(env, default), help=f"{help_} (env {ENV}{env})", **kw)

    opt("--role", "ROLE", "mixed", "prefill | decode | mixed")
    opt("--vendor", "VENDOR", "nvidia", "accelerator vendor of this pod")
    opt("--layers", "LAYERS", "32", "model layers", type=int)
    opt("--kv-heads", "KV_HEADS", "8", "KV heads of the model (the pod's whole KV, all TP ranks)", type=int)
    opt("--head-dim", "HEAD_DIM", "128", "head dimension", type=int)
    opt("--dtype", "DTYPE", "bf16", "KV element type")
    opt("--layout", "LAYOUT", "NHD", "block layout of this worker's engine (NHD | HND)")
    opt("--block-size", "BLOCK_SIZE", "16", "tokens per KV block", type=int)
    opt("--pool-mib", "POOL_MIB", "1024", "host KV pool size in MiB", type=int)
    opt("--staging-mib", "STAGING_MIB", "64", "each of the two translation staging buffers, MiB", type=int)
    opt("--backend", "BACKEND", "UCX", "NIXL backend (UCX | LIBFABRIC)")
    opt(
        "--transfer-threads",
        "TRANSFER_THREADS",
        "0",
        "NIXL transfer threads; 2+ when peers share a host (UCX copies with CMA, one CPU copy per "
        "thread); 0 keeps NIXL's single progress thread (RDMA: the NIC copies)",
        type=int,
    )
    opt("--expect-transport", "EXPECT_TRANSPORT", "tcp", "rdma | tcp: what the operator expects to run")
    opt(
        "--allow-tcp-fallback",
        "ALLOW_TCP_FALLBACK",
        "false",
        "true: TCP is acceptable when RDMA was expected",
    )
    opt("--host", "HOST", "0.0.0.0", "listen address")
    opt("--port", "PORT", "8200", "HTTP port", type=int)
    opt(
        "--probe-interval",
        "PROBE_INTERVAL",
        "30",
        "seconds between bandwidth probes to known peers",
        type=float,
    )
    opt("--ucx-log-tap", "UCX_LOG_TAP", "true", "read UCX's transport selection from its info log")
    opt("--log-level", "LOG_LEVEL", "INFO", "Python logging level")
    return p


def make_sidecar(args: argparse.Namespace, name: str) -> tuple[KvSidecar, FabricReport]:
    from tandem.sidecar.transport import NixlTransport

    geom = KvGeometry(args.layers, args.kv_heads, args.head_dim, DTYPE_BYTES.get(args.dtype, 2))
    fmt = BlockFormat(args.layout, args.block_size)
    num_blocks = max(1, args.pool_mib * MiB // (geom.layers * fmt.block_bytes(geom)))
    config = SidecarConfig(name, geom, fmt, num_blocks, staging_bytes=args.staging_mib * MiB)
    sidecar = KvSidecar(config, NixlTransport(name, args.backend, threads=args.transfer_threads))
    fabric = FabricReport(
        expected="rdma" if args.expect_transport == "rdma" else "tcp",
        allow_tcp_fallback=str(args.allow_tcp_fallback).lower() == "true",
        rdma_devices=rdma_devices(),
        ucx_tls=allowed_transports(os.environ.get("UCX_TLS")),
    )
    return sidecar, fabric


async def serve(server: SidecarServer, host: str, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(server.build_app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logging.getLogger("tandem.sidecar").info("Started KV sidecar on %s:%d", host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tap = None
    if str(args.ucx_log_tap).lower() == "true":
        enable_ucx_selection_log()  # before NIXL loads UCX: lane lines and READ protocol tables
        tap = UcxLogTap()
    # the NIXL agent name must be unique among peers: the pod name, else host and port
    name = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{args.port}"
    sidecar, fabric = make_sidecar(args, name)
    server = SidecarServer(
        sidecar, fabric, tap=tap, settings=ServerSettings(probe_interval_seconds=args.probe_interval)
    )
    try:
        asyncio.run(serve(server, args.host, args.port))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
