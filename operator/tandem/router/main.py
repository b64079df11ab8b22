"""The router's entry point: ``tandem-router`` / ``python -m tandem.router`` / ``tandem router serve``.

Every flag has a ``TANDEM_ROUTER_*`` environment variable; the flag wins, then the variable, then
the default (the contract is in ``worker-images/router/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from tandem.router.config import ConfigError
from tandem.router.server import DEFAULT_RELOAD_SECONDS, Router, build_router

ENV_PREFIX = "TANDEM_ROUTER_"
DEFAULT_CONFIG = "/etc/tandem/router.json"  # where the operator mounts the router ConfigMap
DEFAULT_PORT = 8000  # tandem.names.PORT_HTTP: the router Deployment's probes and Service

logger = logging.getLogger(__name__)


def _env(name: str, default: Any, typ: type = str) -> Any:
    raw = os.environ.get(ENV_PREFIX + name)
    return typ(raw) if raw not in (None, "") else default


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=_env("CONFIG", DEFAULT_CONFIG),
        help=f"router config JSON, reloaded when it changes (env {ENV_PREFIX}CONFIG)",
    )
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"), help=f"listen address (env {ENV_PREFIX}HOST)")
    p.add_argument(
        "--port", type=int, default=_env("PORT", DEFAULT_PORT, int), help=f"HTTP port (env {ENV_PREFIX}PORT)"
    )
    p.add_argument(
        "--reload-seconds",
        type=float,
        default=_env("RELOAD_SECONDS", DEFAULT_RELOAD_SECONDS, float),
        help=f"how often to check the config file for changes (env {ENV_PREFIX}RELOAD_SECONDS)",
    )
    p.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "INFO"), help=f"logging level (env {ENV_PREFIX}LOG_LEVEL)"
    )


class RouterRunner(web.ServerRunner):
    """aiohttp's runner for the router's low-level server (`Router.build_server`): `setup` starts
    the router, then the server; `cleanup` stops the server (in-flight requests get the shutdown
    timeout), then the router."""

    def __init__(self, router: Router, **kwargs: Any) -> None:
        super().__init__(router.build_server(), **kwargs)
        self.router = router

    async def setup(self) -> None:
        await self.router.start()
        await super().setup()

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
        finally:
            await self.router.close()


async def start_router(
    router: Router, host: str, port: int, *, backlog: int = 1024
) -> tuple[RouterRunner, int]:
    """Start ``router`` on ``host:port`` (``port=0``: any free port); returns the runner (call
    ``cleanup()`` to stop) and the bound port. Handlers are cancelled when their client goes away."""
    runner = RouterRunner(router)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=backlog).start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return runner, bound


async def run_router(router: Router, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (what ``web.run_app`` does for an
    `web.Application`)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_router(router, host, port)
    logger.info("Serving on %s:%d", host, bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def install_fast_loop() -> str:
    """Use uvloop's event loop when it is installed (optional, not a dependency: a faster event loop
    for the proxy hop); returns the loop's name for the start-up log."""
    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.reload_seconds <= 0:
        print("error: --reload-seconds must be positive", file=sys.stderr)
        return 2
    try:
        router = build_router(args.config, reload_seconds=args.reload_seconds)
    except (OSError, ConfigError) as exc:
        print(f"error: cannot load the router config {args.config}: {exc}", file=sys.stderr)
        return 2
    logger.info("Using the %s event loop", install_fast_loop())
    asyncio.run(run_router(router, args.host, args.port))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tandem-router", description="Tandem's per-request P/D router (OpenAI-compatible)."
    )
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
