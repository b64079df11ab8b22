"""``tandem explain``'s grouping of a real planner decision (from the simulator): every pool's
and every path's signals land in their tables, and what it does not group is still shown; and
its last section, the Events about the service as ``kubectl describe`` shows them."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tandem import kube
from tandem.bench.run import BenchConfig, _run, tandem_fleet, tandem_router
from tandem.bench.traces import shift
from tandem.cli import main
from tandem.explain import Events, _known, age, render
from tandem.planner.policy import TandemPolicy, planner_spec_for_fleet


def planner_decision() -> Any:
    cfg = BenchConfig()
    fleet = tandem_fleet(cfg)
    spec = planner_spec_for_fleet(
        fleet, cfg.slo, interval_s=cfg.sim.autoscale_interval_s, split_threshold=cfg.split_threshold
    )
    policy = TandemPolicy(spec)
    _run(shift(seed=1, duration_s=1500.0), fleet, cfg, policy, "tandem", tandem_router(cfg))
    _, decision = policy.decisions[-1]  # after the switch to long prompts: both paths in play
    return fleet, decision


def service(fleet: Any, decision: Any) -> dict[str, Any]:
    pools = [
        {"name": p.name, "role": p.role, "acceleratorPool": p.accelerator.name, "desiredReplicas": 1,
         "readyReplicas": 1}
        for p in fleet.pools
    ]  # fmt: skip
    return {
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {"autoscaling": {"mode": "planner"}},
        "status": {
            "pools": pools,
            "ratio": "1:1",
            "lastDecision": {"time": "t0", "reason": decision.reason, "message": decision.message,
                             "signals": dict(decision.signals)},
            "conditions": [{"type": "MetricsAvailable", "status": "True", "reason": "MetricsRead"}],
        },
    }  # fmt: skip


def test_explain_groups_every_pool_and_path_signal() -> None:
    fleet, decision = planner_decision()
    text = render(service(fleet, decision), width=200)
    signals = dict(decision.signals)
    assert f"Last decision: {decision.reason} at t0." in text and "MetricsRead" in text
    for pool in fleet.pools:
        row = next(line for line in text.splitlines() if line.startswith(f"│ {pool.name} "))
        for key in ("capacityRps", "bottleneck", "correction"):
            assert signals[f"{pool.name}.{key}"] in row, (pool.name, key, row)
    assert "Demand per path" in text and "Error budget and routing" in text
    for key in ("split.plannedRps", "mixed.plannedRps", "ttftWithinTarget", "splitThreshold"):
        assert key in signals  # the planner still names them as explain expects
    # what explain does not group is listed as it is, so nothing the planner said is hidden
    rest = set(signals) - _known([p.name for p in fleet.pools])
    for key in rest:
        assert f"{key}={signals[key]}" in text


def test_explain_without_a_status_says_so() -> None:
    text = render({"metadata": {"name": "x", "namespace": "ns"}, "spec": {}})
    assert "No status yet" in text and "ns/x" in text


# ---- the Events section ----------------------------------------------------------------------

NOW = 1_700_000_000.0  # epoch seconds: `now` is data, so ages are exact
OBJ = {
    "apiVersion": "inference.tandem.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
    "spec": {"autoscaling": {"mode": "planner"}},
    "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "AllPoolsReady"}]},
}


def stamp(seconds_ago: float) -> str:
    return datetime.datetime.fromtimestamp(NOW - seconds_ago, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def posted(
    reason: str, seconds_ago: float, note: str = "", type_: str = "Normal", **ref: str
) -> dict[str, Any]:
    """An Event as the operator posts it (events.k8s.io/v1, tandem.controller.post_event)."""
    regarding = {"apiVersion": "inference.tandem.dev/v1alpha1", "kind": "InferenceService", "name": "chat",
                 "namespace": "team-a", "uid": "u-1", **ref}  # fmt: skip
    return {"apiVersion": "events.k8s.io/v1", "kind": "Event", "eventTime": stamp(seconds_ago), "type": type_,
            "reason": reason, "note": note or f"{reason}.", "regarding": regarding}  # fmt: skip


def core(reason: str, first_ago: float, last_ago: float, count: int, message: str) -> dict[str, Any]:
    """An Event in the core/v1 shape (as kopf posts its own, or as the v1 API lists ours)."""
    involved = {"kind": "InferenceService", "name": "chat", "namespace": "team-a", "uid": "u-1"}
    return {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
            "count": count, "firstTimestamp": stamp(first_ago), "lastTimestamp": stamp(last_ago),
            "involvedObject": involved}  # fmt: skip


def event_lines(text: str) -> list[str]:
    """The rows of the Events table (first line of each), after its title."""
    section = text[text.index("\nEvents") :]
    return [line for line in section.splitlines() if line.startswith("│ ") and not line.startswith("│  ")]


def test_events_come_last_newest_last_in_either_shape() -> None:
    items = [
        posted("ScaledUp", 300, "Prefill 1 -> 2."),
        core("HandlerRetried", 4000, 5, 1, "Retried the handler."),  # last seen most recently
        posted("Applied", 60, "Applied Deployment team-a/chat-prefill."),
        posted("PrometheusUnavailable", 1200, "Prometheus did not answer.", type_="Warning"),
    ]
    text = render(OBJ, events=Events(now=NOW, items=items))
    assert text.index("Conditions") < text.index("\nEvents")  # the final section, as in kubectl describe
    rows = event_lines(text)
    assert [r.split("│")[2].strip() for r in rows] == ["PrometheusUnavailable", "ScaledUp", "Applied",
                                                       "HandlerRetried"]  # fmt: skip
    assert rows[0].split("│")[1].strip() == "Warning" and "Prometheus did not answer." in rows[0]
    assert [r.split("│")[3].strip() for r in rows] == ["20m", "5m", "60s", "5s"]


def test_events_about_other_objects_are_left_out() -> None:
    items = [
        posted("Applied", 10),
        posted("Stale", 5, uid="u-0"),  # an earlier InferenceService of the same name
        posted("Elsewhere", 5, namespace="team-b"),
        posted("OtherName", 5, name="code"),
        posted("OtherKind", 5, kind="Deployment"),
    ]
    rows = event_lines(render(OBJ, events=Events(now=NOW, items=items)))
    assert [r.split("│")[2].strip() for r in rows] == ["Applied"]


def test_a_repeated_event_shows_its_count_like_kubectl() -> None:
    series = posted("ScaledUp", 3900)  # events.k8s.io/v1 counts repeats in its series
    series["series"] = {"count": 4, "lastObservedTime": stamp(130)}
    items = [core("HandlerRetried", 4000, 400, 3, "Retried."), series, core("Once", 90, 90, 1, "Once.")]
    rows = event_lines(render(OBJ, events=Events(now=NOW, items=items), width=160))
    ages = {r.split("│")[2].strip(): r.split("│")[3].strip() for r in rows}
    assert ages == {"HandlerRetried": "6m40s (x3 over 66m)", "ScaledUp": "2m10s (x4 over 65m)", "Once": "90s"}


def test_only_the_newest_are_shown_and_the_rest_counted() -> None:
    items = [posted(f"Reason{i:02d}", 1000 - i) for i in range(15)]  # Reason14 is the newest
    text = render(OBJ, events=Events(now=NOW, items=list(reversed(items))))  # the API's order is not time's
    assert [r.split("│")[2].strip() for r in event_lines(text)] == [f"Reason{i:02d}" for i in range(5, 15)]
    assert "5 older Events not shown" in text
    text = render(OBJ, events=Events(now=NOW, items=items, limit=3))
    assert [r.split("│")[2].strip() for r in event_lines(text)] == ["Reason12", "Reason13", "Reason14"]
    assert "12 older Events not shown" in text


def test_events_that_could_not_be_listed_are_a_one_line_note() -> None:
    error = "403 Forbidden: may not list events.events.k8s.io in team-a"
    text = render(OBJ, events=Events(now=NOW, error=error))
    note = [line for line in text.splitlines() if line.startswith("Events")]
    assert note == [f"Events: not listed ({error})."]
    assert text.rstrip().endswith(note[0]) and "Conditions" in text  # the rest is still shown
    narrow = render(OBJ, width=40, events=Events(now=NOW, error=error))
    assert len([line for line in narrow.splitlines() if "not listed" in line or "k8s.io" in line]) == 1


def test_no_events_and_no_section() -> None:
    assert "Events: <none>" in render(OBJ, events=Events(now=NOW, items=[posted("Stale", 5, uid="u-0")]))
    assert "Events" not in render(OBJ)  # --events 0
    # a service without a status yet still shows what was said about it (kopf's handler errors)
    bare = {"kind": "InferenceService", "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"}}
    text = render(bare, events=Events(now=NOW, items=[core("HandlerFailed", 30, 30, 1, "Boom.")]))
    assert "No status yet" in text and "HandlerFailed" in text


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-5, "<invalid>"), (-0.5, "0s"), (119, "119s"), (120, "2m"), (330, "5m30s"), (599, "9m59s"),
     (600, "10m"), (10799, "179m"), (3 * 3600 + 900, "3h15m"), (8 * 3600, "8h"), (49 * 3600, "2d1h"),
     (8 * 86400, "8d"), (733 * 86400, "2y3d"), (9 * 365 * 86400, "9y")],
)  # fmt: skip
def test_ages_read_as_kubectl_prints_them(seconds: float, shown: str) -> None:
    assert age(seconds) == shown


class FakeKube:
    """Kube's request() over canned answers: the object, then pages of Events or an error."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def request(
        self, method: str, path: str, *, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        self.calls.append((path, query or []))
        if "/events" not in path:
            return OBJ
        answer = self.events.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def run_explain(monkeypatch: pytest.MonkeyPatch, fake: FakeKube, *args: str) -> int:
    monkeypatch.setattr(kube, "Kube", lambda: fake)
    return main(["explain", "chat", "-n", "team-a", "--width", "160", *args])


def test_cli_lists_events_page_by_page_with_a_field_selector(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = [{"items": [posted("ScaledUp", 100)], "metadata": {"continue": "c1"}},
             {"items": [posted("Applied", 50)], "metadata": {}}]  # fmt: skip
    fake = FakeKube(pages)
    assert run_explain(monkeypatch, fake) == 0
    (path, first), (_, second) = fake.calls[1:]
    assert path == "/apis/events.k8s.io/v1/namespaces/team-a/events"  # where the operator posts them
    assert ("fieldSelector", "regarding.kind=InferenceService,regarding.name=chat") in first
    assert ("continue", "c1") in second
    assert [r.split("│")[2].strip() for r in event_lines(capsys.readouterr().out)] == ["ScaledUp", "Applied"]


def test_cli_forbidden_events_do_not_fail_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeKube([kube.KubeError(403, "Forbidden", {"message": "events.events.k8s.io is forbidden"})])
    assert run_explain(monkeypatch, fake) == 0
    out = capsys.readouterr().out
    assert "Events: not listed (403 Forbidden: may not list events.events.k8s.io in team-a)." in out
    assert "Conditions" in out
    fake = FakeKube([TimeoutError("read timed out")])
    assert run_explain(monkeypatch, fake) == 0
    assert "Events: not listed (TimeoutError: read timed out)." in capsys.readouterr().out


def test_cli_events_zero_lists_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeKube([])
    assert run_explain(monkeypatch, fake, "--events", "0") == 0
    assert len(fake.calls) == 1 and "Events" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["explain", "chat", "--events", "-1"])
