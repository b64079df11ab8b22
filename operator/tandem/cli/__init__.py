"""The ``tandem`` console script: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). Modules are
imported lazily so that ``tandem perf`` does not pay for kopf or matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module under tandem.cli that implements it
SUBCOMMANDS: dict[str, str] = {
    "operator": "tandem.cli.operator_cmd",
    "perf": "tandem.cli.perf_cmd",
    "simulate": "tandem.cli.simulate_cmd",
    "plan": "tandem.cli.plan_cmd",
    "router": "tandem.cli.router_cmd",
    "explain": "tandem.cli.explain_cmd",
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or list(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        if name in wanted:
            module = importlib.import_module(SUBCOMMANDS[name])
            module.register(sub)
        else:  # listed in --help without importing its module
            sub.add_parser(name, help=f"see `tandem {name} --help`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
