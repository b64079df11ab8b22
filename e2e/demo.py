"""`make demo`: Tandem end to end on the local cluster.

Brings the local cluster up with the demo fleet (fake H100, B200, MI300X and Gaudi 3 nodes), installs
the CRDs and the sample AcceleratorPools, runs the operator, applies a heterogeneous
InferenceService (B200 prefill, Gaudi 3 decode, H100 mixed) and shows where its pods landed.
Then the planner closes the loop on a second service (``autoscaling.mode: planner``): a real
Prometheus, simulated workers and a real router standing in for the KWOK pods (the fleet agent),
and a load generator that sends chat, then long prompts, then stops; the planner's decisions are
printed as they happen and summarised at the end (``--quick``: shorter phases, for CI smoke).
The cluster stays up afterwards for exploring (`make cluster-down` stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.harness import cluster as cluster_mod
from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"


def banner(text: str) -> None:
    print(f"\n\033[1;36m== {text}\033[0m", flush=True)


def planner_demo(cluster: Any, namespace: str, *, quick: bool) -> None:
    """The planner's closed loop on a planner-mode service, with decisions printed as they happen."""
    from rich.console import Console
    from rich.table import Table

    from e2e.harness.fleet_agent import FleetAgent, wait_workers
    from e2e.harness.loadgen import LoadGenerator, LoadReport, Phase
    from e2e.harness.planner_watch import PlannerWatch, Snapshot
    from e2e.harness.prometheus import Prometheus
    from e2e.test_planner_loop import CHAT, ITL, LONG, MINS, MODEL, SERVICE, TTFT
    from e2e.test_planner_loop import service as planner_service

    console = Console()
    banner("The planner: autoscaling.mode planner, interval 5 s, Prometheus + simulated workers + router")
    workdir = STATE_ROOT / "demo"
    prom = Prometheus(workdir / "prometheus")
    prom.start()
    doc = planner_service(prom.url)
    print(yaml.safe_dump(doc["spec"]["pools"], default_flow_style=None, sort_keys=False).strip())
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    agent = FleetAgent(cluster.api(), namespace, SERVICE, prom, workdir / "fleet")
    t0 = time.monotonic()
    load: LoadGenerator | None = None
    phase_of: dict[str, str] = {}

    def show(snap: Snapshot, last: Snapshot | None) -> None:
        d = snap.decision or {}
        r = snap.replicas
        metrics = snap.condition("MetricsAvailable")
        phase = (load.phase if load else None) or ("idle" if load else "warm-up")
        console.print(
            f"[dim]{snap.at - t0:6.1f}s[/] [cyan]{phase:<7}[/] prefill={r.get('prefill', '?')} "
            f"decode={r.get('decode', '?')} mixed={r.get('mixed', '?')}  P:D {snap.ratio} "
            f"(target {snap.target_ratio})  [bold]{d.get('reason', '-')}[/]: {d.get('message', '')}"
            f"  [dim]MetricsAvailable={metrics[0]}[/]"
        )
        phase_of[d.get("time", "")] = phase

    watch = PlannerWatch(cluster.api(), namespace, SERVICE, on_change=show)
    chat = Phase(CHAT.name, CHAT.rate, CHAT.prompt_tokens, CHAT.max_tokens, 15 if quick else 30)
    long = Phase(LONG.name, LONG.rate, LONG.prompt_tokens, LONG.max_tokens, 30 if quick else 60)
    try:
        agent.start()
        wait_workers(agent, MINS, timeout=90)
        agent.wait_router()
        agent.wait_router_replicas(MINS)  # pools named after their roles
        print(
            f"workers: {agent.workers_by_pool()} on loopback; router {agent.router_url}; "
            f"Prometheus {prom.url}"
        )
        watch.start()
        load = LoadGenerator(agent.router_url, MODEL, ttft_s=TTFT, itl_s=ITL).start([chat, long])
        wait_for(
            lambda: load is not None and not load.running,
            timeout=chat.seconds + long.seconds + 60,
            what="load",
        )
        stopped = time.monotonic()
        console.print(f"[dim]{stopped - t0:6.1f}s[/] load stopped; waiting for the scale-down window (20 s)")
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: (s := watch.latest) is not None and s.replicas == MINS and stopped < s.at,
                timeout=40 if quick else 90,
                what="every pool back at its min",
            )
        time.sleep(1.5)
    finally:
        if load is not None:
            load.stop(timeout=30)
        watch.stop()
        agent.stop()
        prom.stop()
        cluster.kubectl("delete", "tisvc", SERVICE, "-n", namespace, "--wait=false", check=False)
    report = load.report if load else LoadReport()
    table = Table(title="Planner summary")
    for col in (
        "phase",
        "requests",
        "ok",
        "SLO attainment",
        "p50 latency",
        "max prefill",
        "max decode",
        "max mixed",
    ):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for phase in (chat, long):
        samples = [s for s in report.samples if s.phase == phase.name]
        times = [s.sent for s in samples]
        span = [h for h in watch.history if times and min(times) <= h.at <= max(times) + 10]
        lat = sorted(s.latency for s in samples)
        att = LoadReport.attainment(samples)
        table.add_row(
            f"{phase.name} ({phase.rate:g}/s x {phase.prompt_tokens} tokens)",
            str(len(samples)),
            str(sum(s.ok for s in samples)),
            "-" if att is None else f"{att:.0%}",
            f"{lat[len(lat) // 2]:.2f} s" if lat else "-",
            *(
                str(max((h.replicas.get(p, 0) for h in span), default=0))
                for p in ("prefill", "decode", "mixed")
            ),
        )
    console.print(table)
    final = watch.latest
    console.print(f"decisions: {' -> '.join(watch.decision_reasons())}")
    if final is not None:
        console.print(
            f"final replicas {final.replicas}, P:D {final.ratio}; "
            f"router split thresholds {agent.stats.split_thresholds}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--namespace", default="tandem-demo")
    parser.add_argument("--keep-operator", action="store_true", help="leave the operator running")
    parser.add_argument("--quick", action="store_true", help="short load phases (CI smoke)")
    parser.add_argument("--no-planner", action="store_true", help="skip the planner part")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    banner("Local cluster (real kube-apiserver, etcd, controller-manager, scheduler; KWOK nodes)")
    cluster = cluster_mod.running() or cluster_mod.up()
    print(cluster.kubectl("version").stdout.strip())
    print(cluster.kubectl("get", "nodes", "-L", "inference.tandem.dev/accelerator-model").stdout)

    banner("CRDs and the sample AcceleratorPools")
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))

    banner("The operator (tandem operator --all-namespaces)")
    log_path = STATE_ROOT / "demo" / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, log_path, resync_seconds=10)
    op.start()
    print(f"running as pid {op.proc.pid if op.proc else '?'}; log: {log_path}")
    try:
        banner(f"A heterogeneous InferenceService in namespace {args.namespace}")
        cluster.kubectl("create", "namespace", args.namespace, check=False)
        print((SAMPLES / "inferenceservice.yaml").read_text())
        applied_at = time.monotonic()
        cluster.kubectl(
            "apply", "--server-side", "-n", args.namespace, "-f", str(SAMPLES / "inferenceservice.yaml")
        )

        def ready() -> bool:
            svc = json.loads(
                cluster.kubectl("get", "tisvc", "llama", "-n", args.namespace, "-o", "json").stdout
            )
            conds = {c["type"]: c for c in (svc.get("status") or {}).get("conditions", [])}
            return conds.get("Ready", {}).get("status") == "True"

        wait_for(ready, timeout=120, what="the InferenceService to become Ready")
        print(f"Ready {time.monotonic() - applied_at:.1f} s after kubectl apply")

        banner("kubectl get tisvc,deploy,pods -o wide")
        print(cluster.kubectl("get", "tisvc,deploy,pods", "-n", args.namespace, "-o", "wide").stdout)
        banner("Which accelerator each worker landed on")
        pods = json.loads(cluster.kubectl("get", "pods", "-n", args.namespace, "-o", "json").stdout)["items"]
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        model_of = {
            n["metadata"]["name"]: n["metadata"]["labels"].get(
                "inference.tandem.dev/accelerator-model", "cpu"
            )
            for n in nodes
        }
        for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
            labels = p["metadata"]["labels"]
            role = labels.get("inference.tandem.dev/role", "router")
            node_name = p["spec"].get("nodeName", "-")
            print(
                f"  {p['metadata']['name']:<40} {role:<8} -> {node_name:<16} {model_of.get(node_name, '?')}"
            )
        banner("AcceleratorPools (devices allocated on each pool's nodes)")

        def counted() -> bool:
            pool = json.loads(cluster.kubectl("get", "accpool", "b200", "-o", "json").stdout)
            return int((pool.get("status") or {}).get("allocatedDevices", 0)) > 0

        wait_for(counted, timeout=30, what="the AcceleratorPools' status to count the new pods")
        print(cluster.kubectl("get", "accpool").stdout)
        banner("Status conditions")
        print(
            cluster.kubectl("get", "tisvc", "llama", "-n", args.namespace, "-o", "jsonpath={.status}").stdout
        )
        if not args.no_planner:
            planner_demo(cluster, args.namespace, quick=args.quick)
    finally:
        if not args.keep_operator:
            op.stop()
    banner(f"Done in {time.monotonic() - t0:.0f} s")
    print("The cluster is still up; to use it:")
    for line in cluster_mod.env_lines(cluster):
        print("  " + line)
    print("Run the operator yourself with `tandem operator -A`; stop the cluster with `make cluster-down`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
