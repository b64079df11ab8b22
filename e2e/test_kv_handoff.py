"""Split requests move their prompts' real KV bytes between two vendors' KV-transfer sidecars.

Real apiserver and operator, the operator's pod templates run by the fleet agent standing in for
the kubelet (e2e/harness/fleet_agent.py, ``kv_sidecars=True``): each worker pod's engine is a
simulated worker and its ``kv-sidecar`` container a real ``python -m tandem.sidecar`` (NIXL over
UCX, on loopback), both with the env the operator wrote. A prefill pool on MI300X (NHD, 16-token
blocks) hands off to a decode pool on Gaudi 3 (HND, 128-token blocks), so every pull is translated
on the way; requests go through the real router. Each decode sidecar checks the bytes it pulled
against the pattern the simulated prefill wrote (``--kv-verify``): a mismatch fails the pull and
the decode worker counts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e.harness.common import sim_service
from e2e.harness.fleet_agent import FleetAgent, wait_workers
from e2e.harness.operator import OperatorProcess, install_crds
from e2e.harness.prometheus import Prometheus
from tandem.sidecar.layout import BlockFormat, KvGeometry

SAMPLES = Path(__file__).parent / "samples"
SERVICE = "handoff"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT_TOKENS = 1500
REQUESTS = 3
LLAMA_8B = KvGeometry(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)
PREFILL_FORMAT = BlockFormat("NHD", 16)  # what the operator derives for MI300X (asserted below)


def service() -> dict[str, Any]:
    doc = sim_service(
        SERVICE,
        [("prefill", "prefill", "mi300x"), ("decode", "decode", "gaudi3")],
        autoscaling={"mode": "off"},
        routing={"disaggregation": "always"},
    )
    doc["spec"]["model"]["name"] = MODEL
    return doc


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def sidecar_env(cluster: Any, namespace: str, pool: str) -> dict[str, str]:
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"inference.tandem.dev/pool={pool}", "-o", "json"
        ).stdout
    )["items"]
    container = next(c for c in pods[0]["spec"]["containers"] if c["name"] == "kv-sidecar")
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_split_requests_move_real_kv_bytes_through_the_sidecars(
    cluster: Any, namespace: str, diagnostics: Any, prometheus: Prometheus, tmp_path: Path
) -> None:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    op = OperatorProcess.for_namespace(cluster, namespace)
    agent = FleetAgent(
        cluster.api(), namespace, SERVICE, prometheus, tmp_path / "fleet", kv_sidecars=True, kv_verify=True
    )
    diagnostics.add_log(op.log_path)
    diagnostics.add_log(agent.router_log)
    try:
        op.start()
        cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(service()))
        agent.start()
        wait_workers(agent, {"prefill": 1, "decode": 1}, timeout=120)
        agent.wait_router()
        agent.wait_router_replicas({"prefill": 1, "decode": 1})
        for path in sorted((tmp_path / "fleet").glob("sidecar-*.log")):
            diagnostics.add_log(path)

        # what the operator derived for the pair: MI300X NHD/16 -> Gaudi 3 HND/128, translated
        prefill_env = sidecar_env(cluster, namespace, "prefill")
        decode_env = sidecar_env(cluster, namespace, "decode")
        assert (prefill_env["TANDEM_KV_LAYOUT"], prefill_env["TANDEM_KV_BLOCK_SIZE"]) == ("NHD", "16")
        assert (decode_env["TANDEM_KV_LAYOUT"], decode_env["TANDEM_KV_BLOCK_SIZE"]) == ("HND", "128")

        body = {"model": MODEL, "prompt": "tandem " * (4 * PROMPT_TOKENS // 7 + 1), "max_tokens": 4}
        body["prompt"] = str(body["prompt"])[: 4 * PROMPT_TOKENS]
        for _ in range(REQUESTS):
            resp = httpx.post(f"{agent.router_url}/v1/completions", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"]

        (decode_worker,) = agent.worker_urls("decode")
        worker_metrics = httpx.get(f"{decode_worker}/metrics", timeout=10).text
        assert metric(worker_metrics, "tandem_sim_kv_fetches_total", outcome="ok") == REQUESTS
        assert metric(worker_metrics, "tandem_sim_kv_fetches_total", outcome="failed") == 0

        # the bytes of the prompt's whole prefill-side blocks, every layer, once per request
        expected = (
            REQUESTS
            * LLAMA_8B.layers
            * PREFILL_FORMAT.blocks_for(PROMPT_TOKENS)
            * (PREFILL_FORMAT.block_bytes(LLAMA_8B))
        )
        (decode_sidecar,) = agent.sidecars("decode")
        sidecar_metrics = httpx.get(f"{decode_sidecar}/metrics", timeout=10).text
        moved = metric(sidecar_metrics, "tandem_kv_transfer_bytes_total", direction="pull")
        assert moved == expected, (moved, expected)
        assert metric(sidecar_metrics, "tandem_kv_transfer_failures_total") == 0
        info = httpx.get(f"{decode_sidecar}/v1/info", timeout=10).json()
        print(f"kv handoff e2e: {moved / 2**20:.0f} MiB pulled, fabric {info.get('fabric')}")
    finally:
        agent.stop()
        op.stop()
