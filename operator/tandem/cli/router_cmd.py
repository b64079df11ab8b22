"""``tandem router``: run the per-request P/D router (``serve``) or measure its overhead (``bench``)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("router", help="run Tandem's OpenAI-compatible P/D router, or bench it")
    sub = p.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    from tandem.router.bench import add_bench_arguments
    from tandem.router.main import add_serve_arguments

    serve = sub.add_parser("serve", help="serve the router (the router image's entry point)")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    bench = sub.add_parser("bench", help="router overhead vs calling simulated workers directly")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)


def run_serve(args: argparse.Namespace) -> int:
    from tandem.router.main import serve

    return serve(args)


def run_bench(args: argparse.Namespace) -> int:
    from tandem.router.bench import run

    return run(args)
