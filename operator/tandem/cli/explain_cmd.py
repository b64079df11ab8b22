"""``tandem explain``: an InferenceService's pools, the planner's last decision and its signals,
the conditions and the latest Events about it, grouped for reading (tandem.explain)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from tandem.explain import Events
    from tandem.kube import Kube

DEFAULT_EVENTS = 10  # as many as a screen shows beside the rest; `kubectl describe` shows all


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="show an InferenceService's pools, planner decision, conditions and Events, grouped",
    )
    p.add_argument("name", help="the InferenceService")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    p.add_argument("--width", type=int, default=120, help="columns of the output")
    p.add_argument(
        "--events",
        type=_count,
        default=DEFAULT_EVENTS,
        metavar="N",
        help=f"show the N newest Events about it (default: {DEFAULT_EVENTS}; 0: none)",
    )
    p.add_argument("--json", action="store_true", help="print the object's status as JSON instead")
    p.set_defaults(func=run)


def list_events(kube: Kube, namespace: str, name: str, limit: int, now: float) -> Events:
    """The Events about the InferenceService ``namespace/name``, from ``events.k8s.io/v1`` (the API
    the operator posts to; kopf's core/v1 Events are listed there too, it is one resource).
    The field selector narrows by kind and name; the renderer matches the uid. A failure to list
    them (RBAC, a timeout) is reported in the section, never as the command's failure."""
    from tandem import names
    from tandem.explain import Events
    from tandem.kube import KubeError

    path = f"/apis/events.k8s.io/v1/namespaces/{quote(namespace)}/events"
    selector = f"regarding.kind={names.KIND_SERVICE},regarding.name={name}"
    items: list[dict[str, Any]] = []
    cont = ""
    try:
        while True:
            query = [("fieldSelector", selector), ("limit", "500")] + ([("continue", cont)] if cont else [])
            page = kube.request("GET", path, query=query)
            items += page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue", "")
            if not cont:
                return Events(now=now, items=items, limit=limit)
    except KubeError as err:
        reason = f"{err.status} {err.reason}"
        if err.status == 403:
            reason += f": may not list events.events.k8s.io in {namespace}"
        return Events(now=now, limit=limit, error=reason)
    except Exception as err:  # a timeout or a dropped connection: the rest is still worth printing
        return Events(now=now, limit=limit, error=f"{type(err).__name__}: {err}")


def run(args: argparse.Namespace) -> int:
    from tandem import names
    from tandem.explain import render
    from tandem.kube import Kube, KubeError, path_of

    try:
        kube = Kube()
        obj = kube.request("GET", path_of(names.KIND_SERVICE, args.namespace, args.name))
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
        return 0
    events = list_events(kube, args.namespace, args.name, args.events, time.time()) if args.events else None
    print(render(obj, width=args.width, events=events), end="")
    return 0
