"""``tandem operator``: runs the controller against the current kubeconfig (or in-cluster)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
from typing import Any

from tandem import names


def register(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the Tandem controller")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    p.add_argument(
        "--peering", default="tandem", help="kopf peering name, so only one replica acts (default: tandem)"
    )
    p.add_argument("--standalone", action="store_true", help="no peering: for a single replica or local runs")
    # kopf pauses *every* operator of a peering when two share a priority (kopf/_core/engines/
    # peering.py: "Pausing all operators, including self"), so replicas started with the same
    # flags would all stand by. A random default makes exactly one of them act (e2e/test_faults.py).
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority; the highest live one acts (default: random per process)",
    )
    p.add_argument("--resync-seconds", type=float, default=60.0, help="level-based resync period")
    p.add_argument("--image-registry", default=names.IMAGE_REGISTRY, help="registry of Tandem's images")
    p.add_argument(
        "--image-tag", default=None, help="tag of Tandem's images (default: the operator's version)"
    )
    p.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="health endpoint URL ('' to disable)"
    )
    p.add_argument("--metrics-port", type=int, default=9090, help="port of /metrics (0 to disable)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="address /metrics listens on")
    p.add_argument(
        "--prometheus-url",
        default=None,
        help="Prometheus for autoscaling.mode planner and recommend "
        "(a service's spec.autoscaling.prometheusUrl wins)",
    )
    p.add_argument(
        "--planner-scale-down-window-seconds",
        type=float,
        default=None,
        help="planner's scale-down stabilisation window (default 600; annotation "
        f"{names.ANNOTATION_PLANNER_DOWN_WINDOW} overrides per service)",
    )
    p.add_argument(
        "--planner-lead-time-seconds",
        type=float,
        default=None,
        help="seconds until a new replica serves, the planner's forecast horizon (default 120; "
        f"annotation {names.ANNOTATION_PLANNER_LEAD_TIME} overrides per service)",
    )
    p.add_argument(
        "--probe-kv-sidecars",
        action="store_true",
        help="ask not-ready KV sidecars (pod IP, port 8200, /readyz) which transport they run, so "
        "KVTransferReady can say TcpFallback; needs the pod network (the chart turns it on)",
    )
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    import tandem
    import tandem.handlers
    from tandem.autoscaler import AutoscalerSettings
    from tandem.builders import Images
    from tandem.controller import Settings
    from tandem.peering import PeeringSettings
    from tandem.planner import Tuning

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every handler call at INFO; our own lines tell the story
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_address)
    priority = args.priority if args.priority is not None else secrets.randbelow(2**31 - 1) + 1
    # kopf's own identity format is internal; any unique string works, and the controller's
    # peering gate must know it to tell its own heartbeat from its peers'
    identity = f"{os.environ.get('POD_ID') or socket.gethostname()}/{secrets.token_hex(6)}"
    peering = (
        None
        if args.standalone
        else PeeringSettings(
            name=args.peering, identity=identity, priority=priority, namespaces=tuple(args.namespace or ())
        )
    )
    memo = kopf.Memo(
        controller_settings=Settings(
            peering=peering,
            resync_seconds=args.resync_seconds,
            images=Images(registry=args.image_registry, tag=args.image_tag or tandem.__version__),
            autoscaler=AutoscalerSettings(prometheus_url=args.prometheus_url, tuning=_tuning(args, Tuning())),
            probe_kv_sidecars=args.probe_kv_sidecars,
        )
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            priority=priority,
            identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
            liveness_endpoint=args.liveness or None,
            memo=memo,
        )
    )
    return 0


def _tuning(args: argparse.Namespace, base: Any) -> Any:
    """The planner's default tuning with the flags that were given."""
    import dataclasses

    changes = {
        field: value
        for field, value in (
            ("down_window_s", args.planner_scale_down_window_seconds),
            ("lead_time_s", args.planner_lead_time_seconds),
        )
        if value is not None
    }
    return dataclasses.replace(base, **changes)
