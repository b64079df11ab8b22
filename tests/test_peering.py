"""kopf's peering rule applied to Tandem's own tasks (tandem.peering), pure parts."""

from __future__ import annotations

import datetime

import pytest

from tandem.peering import decide_active, peering_active

NOW = datetime.datetime(2026, 11, 22, 8, 0, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(
    ("status", "active"),
    [
        ({}, True),  # alone
        ({"me": peer(10, 0)}, True),  # only our own heartbeat
        ({"me": peer(10, 0), "other": peer(5, 1)}, True),  # lower-priority peer stands by
        ({"me": peer(10, 0), "other": peer(20, 1)}, False),  # higher-priority live peer acts
        ({"me": peer(10, 0), "other": peer(10, 1)}, False),  # same priority: kopf pauses both
        ({"me": peer(10, 0), "other": peer(20, 61)}, True),  # the higher one is dead (lifetime 60)
        ({"other": peer(20, 5, lifetime=5)}, True),  # deadline reached exactly: dead
        ({"other": {"priority": "high", "lastseen": NOW.isoformat()}}, False),  # unreadable: stand by
        ({"other": {"priority": 20, "lastseen": "2026-11-22T07:59:59Z"}}, False),  # kopf's Z form
    ],
)
def test_peering_active(status: dict[str, object], active: bool) -> None:
    assert peering_active(status, "me", 10, NOW) is active


def test_every_watched_namespace_must_agree_and_a_missing_object_means_stand_by() -> None:
    alone, outranked = {"me": peer(10, 0)}, {"other": peer(99, 0)}
    assert decide_active([alone, alone], "me", 10, NOW)
    assert not decide_active([alone, outranked], "me", 10, NOW)
    assert not decide_active([alone, None], "me", 10, NOW)
    assert not decide_active([], "me", 10, NOW)
