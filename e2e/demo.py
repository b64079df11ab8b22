"""`make demo`: Tandem end to end on the local cluster.

Brings the local cluster up with the demo fleet (fake H100, B200, MI300X and Gaudi 3 nodes), installs
the CRDs and the sample AcceleratorPools, runs the operator, applies a heterogeneous
InferenceService (B200 prefill, Gaudi 3 decode, H100 mixed) and shows where its pods landed.
The cluster stays up afterwards for exploring (`make cluster-down` stops it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from e2e.harness import cluster as cluster_mod
from e2e.harness.common import STATE_ROOT, wait_for
from e2e.harness.operator import OperatorProcess, install_crds

SAMPLES = Path(__file__).parent / "samples"


def banner(text: str) -> None:
    print(f"\n\033[1;36m== {text}\033[0m", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--namespace", default="tandem-demo")
    parser.add_argument("--keep-operator", action="store_true", help="leave the operator running")
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
