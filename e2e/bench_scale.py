"""`make bench-scale`: the operator at fleet scale. 500 InferenceServices with 3 pools each on the
200-node fake fleet (e2e/fleets/scale-200.yaml), one operator process, on a private cluster
(``$TANDEM_CLUSTER_DIR``, default .tandem/cluster-scale) so the shared one is not loaded.

Reported (bench/out/scale.json), against the issue's goals:
- seconds_to_ready: from `kubectl apply` of all services until all are Ready;
- api_requests_per_reconcile: the operator's API requests (tandem_kube_requests_total) over its
  reconciles (tandem_reconciles_total) during that phase;
- writes_per_resync: operator writes during the steady state divided by resync periods
  (goal: 0);
- rss_mb_start / rss_mb_end / rss_mb_max and cpu_percent over the steady state
  (`--steady-seconds`, default 600; goal: RSS < 300 MB and no growth);
- decide_ms_p50 / decide_ms_p99: `tandem.planner.decide` on a synthetic, plausible observation
  for each service's spec (pure; goal: p99 < 10 ms).
Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e.harness.common import REPO_ROOT, STATE_ROOT, sim_service, wait_for, write_result

SAMPLES = REPO_ROOT / "e2e" / "samples"
SCALE_FLEET = REPO_ROOT / "e2e" / "fleets" / "scale-200.yaml"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def service_doc(name: str, index: int = 0) -> dict[str, Any]:
    """Service ``index`` of the batch: prefill, decode and mixed pools of one device each, spread
    so that 500 of them fit the scale fleet (1,600 devices; B200 and Gaudi 3 have 8 x 40 + the demo
    fleet's, H100 8 x 80): prefill on B200 then H100, decode on Gaudi 3 then MI300X, mixed on H100
    then MI300X."""
    prefill = "b200" if index < 320 else "h100"
    decode = "gaudi3" if index < 320 else "mi300x"
    mixed = "h100" if index < 440 else "mi300x"
    return sim_service(
        name, [("prefill", "prefill", prefill), ("decode", "decode", decode), ("mixed", "mixed", mixed)]
    )


def cpu_nodes(fleet_mod: Any, count: int) -> Any:
    """Untainted CPU nodes for the routers (one per service; 110 pods per node)."""
    group = fleet_mod.NodeGroup(
        name_prefix="scale-cpu",
        count=count,
        labels={"node.kubernetes.io/instance-type": "kwok-cpu"},
        capacity={"cpu": "64", "memory": "256Gi", "pods": "110"},
    )
    return fleet_mod.Fleet(name="scale-cpu", groups=(group,))


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (the operator's Python process), in MB."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE_SIZE / 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def kube_requests(op: Any) -> int:
    return int(sum(v for k, v in op.metrics().items() if k.startswith("tandem_kube_requests_total{")))


def writes_by_kind(op: Any) -> dict[str, float]:
    """tandem_kube_requests_total of the write verbs, by "VERB kind" (which writes a steady state made)."""
    from e2e.harness.operator import WRITE_VERBS

    out: dict[str, float] = {}
    for k, v in op.metrics().items():
        if k.startswith("tandem_kube_requests_total{") and any(f"verb={w}" in k for w in WRITE_VERBS):
            labels = dict(part.split("=", 1) for part in k[k.index("{") + 1 : -1].split(","))
            out[f"{labels.get('verb')} {labels.get('kind')}"] = v
    return out


def count_ready(cluster: Any, namespace: str) -> int:
    out = cluster.kubectl("get", "tisvc", "-n", namespace, "-o", "json", timeout=120).stdout
    n = 0
    for svc in json.loads(out)["items"]:
        st = svc.get("status") or {}
        ok = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
        n += ok and st.get("observedGeneration") == svc["metadata"]["generation"]
    return n


def decide_times_ms(services: int) -> list[float]:
    """``tandem.planner.decide`` timed on each service's spec with a plausible, loaded observation."""
    from tandem.models import AcceleratorPoolSpec, InferenceServiceSpec
    from tandem.planner import Observation, PlannerState, PoolObservation, PoolReading, decide, planner_spec

    pools = {
        d["metadata"]["name"]: AcceleratorPoolSpec.model_validate(d["spec"])
        for d in yaml.safe_load_all((SAMPLES / "acceleratorpools.yaml").read_text())
    }
    times = []
    for i in range(services):
        spec = InferenceServiceSpec.model_validate(service_doc(f"svc-{i}", i)["spec"])
        pspec = planner_spec(spec, pools)
        load = 1.0 + (i % 17)
        metrics = PoolObservation(
            waiting=load,
            running=4 * load,
            kv_usage=min(0.95, 0.05 * load),
            prompt_tokens_per_s=800 * load,
            generation_tokens_per_s=120 * load,
            requests_per_s=0.5 * load,
            mean_ttft_s=0.3 + 0.05 * load,
            mean_itl_s=0.02 + 0.002 * load,
            mean_prompt_tokens=1600.0,
            mean_output_tokens=240.0,
            scrape_age_s=5.0,
        )
        observation = Observation(
            pools={p.name: PoolReading(replicas=1, ready=1, starting=0, metrics=metrics) for p in spec.pools}
        )
        t0 = time.perf_counter()
        decide(pspec, observation, PlannerState(), now=1000.0)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default="bench/out/scale.json")
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--steady-seconds", type=float, default=600.0)
    parser.add_argument("--resync-seconds", type=float, default=60.0)
    parser.add_argument(
        "--max-rss-mb", type=float, default=4000.0, help="abort if the operator outgrows this"
    )
    parser.add_argument("--keep-cluster", action="store_true", help="leave the private cluster running")
    args = parser.parse_args(argv)
    os.environ.setdefault("TANDEM_CLUSTER_DIR", str(STATE_ROOT / "cluster-scale"))
    # imported after TANDEM_CLUSTER_DIR is set: the harness reads it at import
    from e2e.harness import cluster as cluster_mod
    from e2e.harness import fleet as fleet_mod
    from e2e.harness.operator import OperatorProcess, install_crds

    result: dict[str, Any] = {"services": args.services, "pools_per_service": 3}
    t_dec = decide_times_ms(args.services)
    result["decide_ms_p50"] = round(statistics.median(t_dec), 3)
    result["decide_ms_p99"] = round(percentile(t_dec, 0.99), 3)

    started_cluster = cluster_mod.running() is None
    cluster = cluster_mod.up()
    op = None
    try:
        install_crds(cluster)
        cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
        fleet_mod.register_and_wait(cluster.api(), fleet_mod.load_fleet(SCALE_FLEET), timeout=300)
        fleet_mod.register_and_wait(
            cluster.api(), cpu_nodes(fleet_mod, args.services // 100 + 1), timeout=120
        )
        ns = f"scale-{int(time.time())}"
        cluster.kubectl("create", "namespace", ns)
        wait_for(lambda: "default" in cluster.kubectl("get", "sa", "-n", ns, "-o", "name").stdout, timeout=30)
        op = OperatorProcess(
            cluster.kubeconfig,
            STATE_ROOT / "bench" / "operator-scale.log",
            namespaces=[ns],
            resync_seconds=args.resync_seconds,
            standalone=True,
        )
        op.start()
        assert op.proc is not None
        pid = op.proc.pid
        result["rss_mb_idle"] = round(rss_mb(pid), 1)
        with tempfile.TemporaryDirectory() as tmp:
            batch = Path(tmp) / "services.yaml"
            batch.write_text(yaml.safe_dump_all([service_doc(f"svc-{i}", i) for i in range(args.services)]))
            req0, rec0 = kube_requests(op), op.reconciles()
            t0 = time.monotonic()
            cluster.kubectl("apply", "--server-side", "-n", ns, "-f", str(batch), timeout=600)

            def all_ready() -> str | None:
                # a guard for the shared machine: stop if the operator outgrows --max-rss-mb
                if rss_mb(pid) > args.max_rss_mb:
                    return f"operator RSS {rss_mb(pid):.0f} MB > --max-rss-mb {args.max_rss_mb:.0f}"
                return "ready" if count_ready(cluster, ns) == args.services else None

            outcome = wait_for(all_ready, timeout=3600, interval=2.0, what=f"{args.services} Ready")
            if outcome != "ready":
                result["aborted"] = outcome
                result["ready_when_aborted"] = count_ready(cluster, ns)
                result["rss_mb_when_aborted"] = round(rss_mb(pid), 1)
                try:  # an operator this large may not answer /metrics in time
                    result["reconciles_when_aborted"] = op.reconciles() - rec0
                    result["api_requests_when_aborted"] = kube_requests(op) - req0
                except httpx.HTTPError as exc:
                    result["metrics_when_aborted"] = f"unavailable: {type(exc).__name__}"
                result["seconds_when_aborted"] = round(time.monotonic() - t0, 1)
                return write_result(args.out, result)
            result["seconds_to_ready"] = round(time.monotonic() - t0, 1)
            req1, rec1 = kube_requests(op), op.reconciles()
        result["api_requests_to_ready"] = req1 - req0
        result["reconciles_to_ready"] = rec1 - rec0
        result["api_requests_per_reconcile"] = round((req1 - req0) / max(1, rec1 - rec0), 2)
        # settle: one full resync after Ready, so status writes of the last services are done
        time.sleep(args.resync_seconds + 5)
        w0, r0, c0 = op.kube_writes(), op.reconciles(), cpu_seconds(pid)
        by_kind0 = writes_by_kind(op)
        result["rss_mb_start"] = round(rss_mb(pid), 1)
        rss = [result["rss_mb_start"]]
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.steady_seconds:
            time.sleep(min(10.0, args.steady_seconds))
            rss.append(round(rss_mb(pid), 1))
        elapsed = time.monotonic() - t0
        w1, r1, c1 = op.kube_writes(), op.reconciles(), cpu_seconds(pid)
        resyncs = elapsed / args.resync_seconds
        result["steady_seconds"] = round(elapsed, 1)
        result["steady_reconciles"] = r1 - r0
        result["steady_writes"] = w1 - w0
        by_kind1 = writes_by_kind(op)
        result["steady_writes_by_kind"] = {
            k: v - by_kind0.get(k, 0) for k, v in sorted(by_kind1.items()) if v - by_kind0.get(k, 0)
        }
        result["writes_per_resync"] = round((w1 - w0) / max(resyncs, 1e-9), 3)
        result["rss_mb_end"] = rss[-1]
        result["rss_mb_max"] = max(rss)
        result["cpu_percent_steady"] = round(100 * (c1 - c0) / elapsed, 1)
        result["goals"] = {
            "writes_per_resync_0": result["writes_per_resync"] == 0,
            "rss_under_300mb": result["rss_mb_max"] < 300,
            "rss_no_growth": result["rss_mb_end"] <= result["rss_mb_start"] * 1.05,
            "decide_p99_under_10ms": result["decide_ms_p99"] < 10,
        }
    finally:
        if op is not None:
            op.stop()
        if started_cluster and not args.keep_cluster:
            cluster_mod.down()
    return write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
