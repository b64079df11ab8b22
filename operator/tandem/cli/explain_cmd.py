"""``tandem explain``: an InferenceService's pools, the planner's last decision and its signals,
and the conditions, grouped for reading (tandem.explain)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain", help="show an InferenceService's pools, planner decision and conditions, grouped"
    )
    p.add_argument("name", help="the InferenceService")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    p.add_argument("--width", type=int, default=120, help="columns of the output")
    p.add_argument("--json", action="store_true", help="print the object's status as JSON instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem import names
    from tandem.explain import render
    from tandem.kube import Kube, KubeError, path_of

    try:
        obj = Kube().request("GET", path_of(names.KIND_SERVICE, args.namespace, args.name))
    except KubeError as err:
        what = f"InferenceService {args.namespace}/{args.name}"
        reason = "not found" if err.status == 404 else f"{err.status} {err.reason}"
        print(f"error: {what}: {reason}", file=sys.stderr)
        return 1
    except Exception as err:  # no kubeconfig, unreachable apiserver
        print(f"error: cannot reach the cluster: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(obj.get("status") or {}, indent=2, sort_keys=True))
    else:
        print(render(obj, width=args.width), end="")
    return 0
