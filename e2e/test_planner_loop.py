"""The planner's closed loop on the real local cluster.

Real apiserver and operator process, a real Prometheus (private to this test: it is stopped in
the middle), real simulated workers standing in for the KWOK pods and a real router (the fleet
agent, e2e/harness/fleet_agent.py), and a bounded load generator sending through the router.

Scenario: steady chat load -> stable replicas; a shift to long prompts -> prefill grows relative
to decode within a few planner intervals and SLO attainment recovers; Prometheus stopped while
the load goes on -> MetricsAvailable=False, no scale-down; Prometheus back and the load stopped
-> every pool back to its min after the scale-down window.

Knobs for a short run: intervalSeconds 5 (the CRD minimum), a 20 s scale-down window and a 10 s
lead time through the planner-tuning annotations (no CRD field yet), workers at time scale 1
(wall rates are model rates, so the planner's capacity model and the workers agree).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.harness.common import wait_for
from e2e.harness.fleet_agent import FleetAgent, wait_workers
from e2e.harness.loadgen import LoadGenerator, LoadReport, Phase
from e2e.harness.operator import OperatorProcess, install_crds, wait_seconds
from e2e.harness.planner_watch import PlannerWatch, Snapshot
from e2e.harness.prometheus import Prometheus

# Part of `make e2e` (and `make test`); `make e2e-planner` runs it alone.
pytestmark = pytest.mark.closed_loop

SAMPLES = Path(__file__).parent / "samples"
SERVICE = "chat"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
INTERVAL = 5
DOWN_WINDOW = 20
RATE_WINDOW = 2 * INTERVAL  # tandem.autoscaler.window_seconds
TTFT, ITL = 1.0, 0.05
MINS = {"prefill": 1, "decode": 1, "mixed": 1}
CHAT = Phase("chat", rate=6.0, prompt_tokens=300, max_tokens=32, seconds=30)
LONG = Phase("long", rate=10.0, prompt_tokens=4000, max_tokens=32, seconds=150)


def service(prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {
            "name": SERVICE,
            "annotations": {
                "inference.tandem.dev/planner-scale-down-window-seconds": str(DOWN_WINDOW),
                "inference.tandem.dev/planner-lead-time-seconds": "10",
            },
        },
        "spec": {
            "model": {"name": MODEL, "preset": "llama-3.1-8b"},
            "engine": "sim",
            "pools": [
                {
                    "name": "prefill",
                    "role": "prefill",
                    "acceleratorPool": "b200",
                    "replicas": {"min": 1, "max": 4},
                },
                {
                    "name": "decode",
                    "role": "decode",
                    "acceleratorPool": "gaudi3",
                    "replicas": {"min": 1, "max": 3},
                },
                {
                    "name": "mixed",
                    "role": "mixed",
                    "acceleratorPool": "h100",
                    "replicas": {"min": 1, "max": 2},
                },
            ],
            "slo": {"ttftSeconds": TTFT, "itlSeconds": ITL},
            "autoscaling": {"mode": "planner", "intervalSeconds": INTERVAL, "prometheusUrl": prometheus_url},
            "routing": {"disaggregation": "auto", "minPromptTokens": 1024},
        },
    }


def get(cluster: Any, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)  # type: ignore[no-any-return]


def tandem_explain(cluster: Any, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "explain", SERVICE, "-n", namespace, *args],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def explain_events(stdout: str) -> list[tuple[str, str]]:
    """(type, reason) of each row of `tandem explain`'s Events table, its last section (none when
    that section is a note instead: no Events, or they could not be listed)."""
    _, title, section = stdout.rpartition("\nEvents")
    assert title, stdout
    rows = [line.split("│") for line in section.splitlines() if line.startswith("│ ")]
    return [(row[1].strip(), row[2].strip()) for row in rows if row[1].strip()]  # not a message's 2nd line


def deployment_replicas(cluster: Any, namespace: str) -> dict[str, int]:
    items = get(cluster, namespace, "deployments", "-l", f"inference.tandem.dev/service={SERVICE}")["items"]
    return {
        d["metadata"]["labels"]["inference.tandem.dev/pool"]: int(d["spec"]["replicas"])
        for d in items
        if "inference.tandem.dev/pool" in d["metadata"]["labels"]
    }


def pd(replicas: dict[str, int]) -> float:
    return replicas["prefill"] / replicas["decode"]


@pytest.fixture
def private_prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_planner_scales_prefill_for_long_prompts_and_holds_without_metrics(
    cluster: Any, namespace: str, diagnostics: Any, private_prometheus: Prometheus, tmp_path: Path
) -> None:
    prom = private_prometheus
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "-f", str(SAMPLES / "acceleratorpools.yaml"))
    op = OperatorProcess.for_namespace(cluster, namespace, resync_seconds=5)
    agent = FleetAgent(cluster.api(), namespace, SERVICE, prom, tmp_path / "fleet", time_scale=1.0)
    diagnostics.add_log(op.log_path)
    diagnostics.add_log(agent.router_log)
    watch = PlannerWatch(cluster.api(), namespace, SERVICE)
    load = LoadGenerator("http://127.0.0.1:1", MODEL, ttft_s=TTFT, itl_s=ITL)
    try:
        op.start()
        cluster.kubectl(
            "apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(service(prom.url))
        )
        agent.start()
        wait_workers(agent, MINS, timeout=90)
        agent.wait_router()
        agent.wait_router_replicas(MINS)  # pools named after their roles
        watch.start()

        # steady chat load: the planner reads metrics and keeps every pool where it is
        load = LoadGenerator(agent.router_url, MODEL, ttft_s=TTFT, itl_s=ITL).start([CHAT, LONG])
        wait_for(
            lambda: (s := watch.latest) and s.condition("MetricsAvailable") == ("True", "MetricsRead"),
            timeout=60,
            what="MetricsAvailable=True",
        )
        chat_settled = time.monotonic()
        wait_for(lambda: load.phase == "long", timeout=CHAT.seconds + 30, what="the long-prompt phase")
        shift = time.monotonic()
        chat = [s for s in watch.since(chat_settled) if s.at < shift]
        assert chat and all(s.replicas == MINS for s in chat), [s.replicas for s in chat]
        chat_samples = load.report.window(0, shift, phase="chat")
        assert chat_samples and sum(s.ok for s in chat_samples) >= 0.98 * len(chat_samples)

        # long prompts: prefill grows relative to decode within three intervals (after the rate window)
        def scaled_up() -> Snapshot | None:
            s = watch.latest
            return s if s and s.replicas.get("prefill", 1) > 1 and pd(s.replicas) > pd(MINS) else None

        up = wait_for(
            scaled_up, timeout=RATE_WINDOW + 3 * INTERVAL + 10, what="prefill to grow relative to decode"
        )
        assert up.target_ratio is not None and up.ratio == up.target_ratio
        # the error budget is read from the real Prometheus: the router's histogram of first
        # tokens as the (streaming) clients see them
        signals = ((watch.latest and watch.latest.decision) or {}).get("signals") or {}
        assert 0.0 <= float(signals.get("ttftWithinTarget", "nan")) <= 1.0, signals
        assert signals.get("errorBudget") in ("ok", "spent"), signals
        assert signals.get("errorBudgetSource") == "router", signals
        # and the demand from the router's arrivals, which the engines' finished requests trail
        assert signals.get("demandSource") == "router", signals
        reasons = watch.decision_reasons(shift)
        assert {"ScaledUp", "Rebalanced"} & set(reasons), reasons
        wait_workers(agent, {k: v for k, v in up.replicas.items()}, timeout=60)
        # attainment recovers: requests sent once the new replicas serve do at least as well as
        # those sent at the shift, and reach 0.75 when the shift hurt (0.9 when it did not)
        early = LoadReport.attainment(load.report.window(shift, up.at, phase="long")) or 0.0
        recovered = time.monotonic() + 2 * INTERVAL
        closed = recovered + 2 * INTERVAL
        wait_seconds(4 * INTERVAL)
        # every request of the window is judged, the slow ones too: wait for their answers
        wait_for(lambda: load.in_flight_sent_before(closed) == 0, timeout=60, what="the window's answers")
        late = load.report.window(recovered, closed, phase="long")
        attained = LoadReport.attainment(late)
        latencies = sorted(round(s.latency, 2) for s in late)
        assert attained is not None and attained >= min(0.9, max(early, 0.75)), (early, attained, latencies)
        print(f"planner e2e: attainment at the shift {early:.2f}, after the scale-up {attained:.2f}")
        # the split path handed the KV over: decode workers pulled it, none recomputed a prompt
        pulls = {
            r["metric"]["outcome"]: float(r["value"][1])
            for r in prom.query(f'sum by (outcome) (tandem_sim_kv_fetches_total{{namespace="{namespace}"}})')
        }
        assert pulls.get("ok", 0) > 0 and pulls.get("failed", 0) == 0, pulls

        # Prometheus gone while the load goes on: no decision, no scale-down, MetricsAvailable=False
        prom.stop()
        wait_for(
            lambda: (
                (s := watch.latest) and s.condition("MetricsAvailable") == ("False", "PrometheusUnavailable")
            ),
            timeout=4 * INTERVAL,
            what="MetricsAvailable=False/PrometheusUnavailable",
        )
        outage = time.monotonic()
        # replicas as the last decision before the outage left them (one may land while it starts)
        wait_seconds(2)
        before = deployment_replicas(cluster, namespace)
        assert before["prefill"] > MINS["prefill"]
        wait_seconds(DOWN_WINDOW + 3 * INTERVAL)  # longer than the scale-down window
        assert deployment_replicas(cluster, namespace) == before
        assert all(s.replicas == before for s in watch.since(outage + 2))
        assert ((watch.latest and watch.latest.decision) or {}).get("reason") == "PrometheusUnavailable"

        # Prometheus back, load stopped: every pool returns to its min after the scale-down window
        prom.start()
        wait_for(
            lambda: (s := watch.latest) and s.condition("MetricsAvailable")[0] == "True",
            timeout=6 * INTERVAL,
            what="MetricsAvailable=True again",
        )
        load.stop()
        stopped = time.monotonic()
        wait_for(
            lambda: deployment_replicas(cluster, namespace) == MINS,
            timeout=RATE_WINDOW + DOWN_WINDOW + 8 * INTERVAL,
            what="every pool back at its min",
        )
        # the Deployments are applied before the status carrying the decision is written
        wait_for(
            lambda: {"ScaledDown", "Rebalanced"} & set(watch.decision_reasons(stopped)),
            timeout=20,
            what="a ScaledDown or Rebalanced decision in the status",
        )
        wait_workers(agent, MINS, timeout=30)

        # what else the loop published: the router's split threshold, Events, the operator's metrics
        cm = get(cluster, namespace, "configmap", f"{SERVICE}-router")
        threshold = json.loads(cm["data"]["router.json"])["splitThresholdTokens"]
        router_doc = json.loads(agent.router_config_path.read_text())
        assert router_doc["splitThresholdTokens"] == threshold
        assert all(p["endpoints"] for p in router_doc["pools"])
        events = get(cluster, namespace, "events")["items"]
        event_reasons = {e.get("reason") for e in events}
        assert "ScaledUp" in event_reasons or "Rebalanced" in event_reasons, event_reasons
        assert "PrometheusUnavailable" in event_reasons, event_reasons
        metrics = op.metrics()
        decided = {k for k, v in metrics.items() if k.startswith("tandem_planner_decisions_total{") and v > 0}
        assert any("reason=PrometheusUnavailable" in k for k in decided), decided
        assert any("reason=ScaledUp" in k or "reason=Rebalanced" in k for k in decided), decided
        assert (
            metrics[
                f"tandem_planner_desired_replicas{{namespace={namespace},pool=prefill,service={SERVICE}}}"
            ]
            == 1
        )
        # its memory, kept for a restart in a ConfigMap the service owns (not a managed child)
        kept = get(cluster, namespace, "configmap", f"{SERVICE}.planner-state")
        svc = get(cluster, namespace, "inferenceservice", SERVICE)
        assert [o["uid"] for o in kept["metadata"]["ownerReferences"]] == [svc["metadata"]["uid"]]
        assert json.loads(kept["data"]["state"])["recommendations"], kept["data"]["state"][:200]
        # the error budget it read, beside the target, for alerting (the chart's PrometheusRule)
        slo = f"{{namespace={namespace},service={SERVICE}}}"
        assert metrics[f"tandem_planner_attainment_target_ratio{slo}"] == 0.9
        assert 0.0 <= metrics[f"tandem_planner_ttft_within_target_ratio{slo}"] <= 1.0
        # and `tandem explain` groups what the status says for a person
        explain = tandem_explain(cluster, namespace)
        assert explain.returncode == 0, explain.stderr
        assert "Last decision:" in explain.stdout and "Error budget and routing" in explain.stdout
        assert all(f"│ {pool} " in explain.stdout for pool in MINS), explain.stdout
        # then the newest Events about it, listed from the real apiserver (at most 10 by default)
        assert 1 <= len(explain_events(explain.stdout)) <= 10, explain.stdout
        # older ones on request: the Warning posted when Prometheus went away, and a scale-up's
        explain = tandem_explain(cluster, namespace, "--events", "1000")
        assert explain.returncode == 0, explain.stderr
        shown = explain_events(explain.stdout)
        assert ("Warning", "PrometheusUnavailable") in shown, explain.stdout
        assert {"ScaledUp", "Rebalanced"} & {reason for _, reason in shown}, explain.stdout
        # a restarted operator starts from that memory, not afresh
        op.stop()
        op.start()
        restored = f"Restored the planner memory of {namespace}/{SERVICE}"
        wait_for(lambda: restored in op.log_text(), timeout=60, what="the planner memory restored")
        print(
            f"planner e2e: reasons {watch.decision_reasons()}, thresholds {agent.stats.split_thresholds}, "
            f"{len(load.report.samples)} requests, dropped {load.report.dropped}"
        )
    finally:
        load.stop(timeout=30)
        watch.stop()
        agent.stop()
        op.stop()
