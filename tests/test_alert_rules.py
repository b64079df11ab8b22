"""The chart's PrometheusRule, checked and evaluated by Prometheus's own promtool: the rules
parse, and on synthetic series each alert fires for the services it is about and for no other
(`promtool test rules` evaluates them as a Prometheus server would, `for` durations included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # e2e.harness.chart (helm)

from e2e.harness.chart import find, render

PROMTOOL = Path("/usr/bin/promtool")

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(not PROMTOOL.exists(), reason="needs /usr/bin/promtool (apt-get install prometheus)"),
]


def gauge(name: str, service: str, values: str, **extra: str) -> dict[str, str]:
    labels = ",".join(f'{k}="{v}"' for k, v in {"namespace": "team-a", "service": service, **extra}.items())
    return {"series": f"{name}{{{labels}}}", "values": values}


def expected(rule: dict, **labels: str) -> dict:
    """The alert promtool should report: the rule's labels plus ``labels``, its annotations with
    the label templates expanded."""
    notes = {}
    for key, text in rule["annotations"].items():
        for name, value in labels.items():
            text = text.replace(f"{{{{ $labels.{name} }}}}", value)
        notes[key] = text
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": notes}


def test_alert_rules_parse_and_fire_for_the_right_services(tmp_path: Path) -> None:
    docs = render(set_values=["metrics.prometheusRule.enabled=true"])
    (rule_obj,) = find(docs, "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule_obj["spec"]))
    check = subprocess.run([str(PROMTOOL), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = {r["alert"]: r for g in rule_obj["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {
        "TandemPlannerHolding",
        "TandemPlannerBudgetLimited",
        "TandemPlannerAtMaxReplicas",
        "TandemPlannerSloInfeasible",
        "TandemReconcileErrors",
        "TandemSloAttainmentLow",
        "TandemCrdOutdated",
    }
    crd = "inferenceservices.inference.tandem.dev"

    inputs = [
        gauge("tandem_planner_holding", "held", "1x40"),  # Prometheus unreachable all along
        gauge("tandem_planner_holding", "flaky", "1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0"),
        gauge("tandem_planner_holding", "fine", "0x40"),
        gauge("tandem_planner_limited", "capped", "1x40", by="budget"),
        gauge("tandem_planner_limited", "full", "1x40", by="max"),
        gauge("tandem_planner_limited", "stuck", "1x40", by="infeasible"),
        gauge("tandem_planner_limited", "fine", "0x40", by="budget"),
        # attainment: "slow" below its 0.9 target, "fine" above it; "held" has no reading
        # "slow" exported by two operator pods at once (a leader hand-over): one alert all the same
        gauge("tandem_planner_ttft_within_target_ratio", "slow", "0.8x40", pod="op-a"),
        gauge("tandem_planner_attainment_target_ratio", "slow", "0.9x40", pod="op-a"),
        gauge("tandem_planner_ttft_within_target_ratio", "slow", "0.8x40", pod="op-b"),
        gauge("tandem_planner_attainment_target_ratio", "slow", "0.9x40", pod="op-b"),
        gauge("tandem_planner_holding", "held", "1x40", pod="op-b"),
        gauge("tandem_planner_ttft_within_target_ratio", "fine", "0.95x40"),
        gauge("tandem_planner_attainment_target_ratio", "fine", "0.9x40"),
        gauge("tandem_planner_attainment_target_ratio", "held", "0.9x40"),
        # reconciles: "broken" fails all along (exported by both pods of a hand-over for a while)
        gauge("tandem_reconcile_consecutive_errors", "broken", "1+1x40", pod="op-a"),
        gauge("tandem_reconcile_consecutive_errors", "broken", "1+1x14", pod="op-b"),
        gauge("tandem_reconcile_consecutive_errors", "fine", "0x40"),
        gauge("tandem_reconcile_consecutive_errors", "flaky", "1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0"),
        # fail for 15 minutes, then one reconciles again and the other is deleted (its series
        # removed: Prometheus marks it stale at the next scrape)
        gauge("tandem_reconcile_consecutive_errors", "recovered", "1+1x14 0x25"),
        gauge("tandem_reconcile_consecutive_errors", "deleted", "1+1x14 stale"),
        # the cluster's InferenceService CRD lacks 3 fields (reported by both pods of a
        # hand-over for a while); the AcceleratorPool CRD is current
        {"series": f'tandem_crd_missing_fields{{crd="{crd}",pod="op-a"}}', "values": "3x40"},
        {"series": f'tandem_crd_missing_fields{{crd="{crd}",pod="op-b"}}', "values": "3x14"},
        {
            "series": 'tandem_crd_missing_fields{crd="acceleratorpools.inference.tandem.dev"}',
            "values": "0x40",
        },
    ]
    fired = {  # alert -> the labels of the one alert it should raise
        "TandemPlannerHolding": {"service": "held"},
        "TandemSloAttainmentLow": {"service": "slow"},
        "TandemPlannerBudgetLimited": {"service": "capped", "by": "budget"},
        "TandemPlannerAtMaxReplicas": {"service": "full", "by": "max"},
        "TandemPlannerSloInfeasible": {"service": "stuck", "by": "infeasible"},
    }
    at_25m = [
        {
            "eval_time": "25m",
            "alertname": name,
            "exp_alerts": [expected(rules[name], namespace="team-a", **labels)],
        }
        for name, labels in fired.items()
    ]
    tests = {
        "rule_files": [rules_file.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    # pending, not firing, before the `for` (10 minutes) has passed
                    {"eval_time": "5m", "alertname": "TandemPlannerHolding", "exp_alerts": []},
                    *at_25m,
                    {
                        "eval_time": "25m",
                        "alertname": "TandemCrdOutdated",
                        "exp_alerts": [expected(rules["TandemCrdOutdated"], crd=crd)],
                    },
                    # while failing, one alert per failing service, none for the others
                    {
                        "eval_time": "12m",
                        "alertname": "TandemReconcileErrors",
                        "exp_alerts": [
                            expected(rules["TandemReconcileErrors"], namespace="team-a", service=service)
                            for service in ("broken", "recovered", "deleted")
                        ],
                    },
                    # after the recovery and the deletion, only the service still failing
                    {
                        "eval_time": "16m",
                        "alertname": "TandemReconcileErrors",
                        "exp_alerts": [
                            expected(rules["TandemReconcileErrors"], namespace="team-a", service="broken")
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                # everything healthy: no alert at all
                "input_series": [
                    gauge("tandem_planner_holding", "fine", "0x40"),
                    gauge("tandem_planner_limited", "fine", "0x40", by="budget"),
                    gauge("tandem_reconcile_consecutive_errors", "fine", "0x40"),
                    {"series": f'tandem_crd_missing_fields{{crd="{crd}"}}', "values": "0x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": name, "exp_alerts": []} for name in rules
                ],
            },
        ],
    }
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(test_file)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_alert_windows_follow_the_for_value() -> None:
    docs = render(set_values=["metrics.prometheusRule.enabled=true", "metrics.prometheusRule.for=30m"])
    (rule_obj,) = find(docs, "PrometheusRule")
    for rule in (r for g in rule_obj["spec"]["groups"] for r in g["rules"]):
        windowed = "increase(" in rule["expr"]  # the counters' lookback; gauges have none
        assert rule["for"] == "30m" and (not windowed or "[30m]" in rule["expr"]), rule["alert"]
