"""The agent's registry of load balancer reports: bounds, expiry and the state of each LB.

Pure: every call takes `now`, so time is a number the test moves.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.lbreports import (
    MAX_LBS,
    Current,
    LbRegistry,
    LbReport,
    TooManyLbs,
    expiry_s,
    valid_name,
)

REPORT = LbReport(
    adapter="haproxy",
    applied_revision=7,
    applied_epoch="e1",
    applied_at=1000.0,
    desired_revision=7,
    ok=True,
    error=None,
    heartbeat_s=5.0,
)
AT_7 = Current(revision=7, epoch="e1", age_s=100.0)


def test_expiry_is_ten_heartbeats_but_never_under_the_floor() -> None:
    assert expiry_s(5.0) == 60.0
    assert expiry_s(30.0) == 300.0
    assert expiry_s(0.5, min_expiry_s=3.0) == 5.0
    assert expiry_s(0.1, min_expiry_s=3.0) == 3.0


@pytest.mark.parametrize("name", ["haproxy@lb-1.example.com", "a", "x" * 64, "nginx_2@h-3"])
def test_good_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "slash/y", "ü", "new\nline", "colon:x"])
def test_bad_names(name: str) -> None:
    assert not valid_name(name)


def test_a_report_is_stored_and_replaced_by_the_next_one() -> None:
    reg = LbRegistry()
    reg.put("lb-a", REPORT, now=10.0)
    reg.put("lb-a", replace(REPORT, applied_revision=8, desired_revision=8), now=12.0)
    (entry,) = reg.entries(now=13.0)
    assert entry.name == "lb-a"
    assert entry.report.applied_revision == 8
    assert entry.reported_at == 12.0
    view = entry.view(AT_7, now=13.0)
    assert view.age_s == pytest.approx(1.0)


def test_entries_are_sorted_by_name() -> None:
    reg = LbRegistry()
    for name in ("zeta", "alpha", "mid"):
        reg.put(name, REPORT, now=1.0)
    assert [e.name for e in reg.entries(now=2.0)] == ["alpha", "mid", "zeta"]


def test_a_new_name_past_the_limit_is_refused_and_existing_names_still_update() -> None:
    reg = LbRegistry(limit=3)
    for i in range(3):
        reg.put(f"lb-{i}", REPORT, now=1.0)
    with pytest.raises(TooManyLbs) as raised:
        reg.put("lb-3", REPORT, now=2.0)
    assert raised.value.http_status == 429
    assert "3" in raised.value.detail
    assert len(reg) == 3
    reg.put("lb-1", replace(REPORT, applied_revision=9), now=2.0)
    assert {e.name: e.report.applied_revision for e in reg.entries(now=2.0)}["lb-1"] == 9
    assert "lb-3" not in {e.name for e in reg.entries(now=2.0)}


def test_the_default_limit_is_1024() -> None:
    assert MAX_LBS == 1024
    assert LbRegistry().limit == 1024


def test_a_report_expires_when_no_report_came_for_the_expiry() -> None:
    reg = LbRegistry(min_expiry_s=60.0)
    reg.put("quick", REPORT, now=0.0)  # heartbeat 5: expires after 60 s
    reg.put("slow", replace(REPORT, heartbeat_s=30.0), now=0.0)  # expires after 300 s
    assert {e.name for e in reg.entries(now=59.9)} == {"quick", "slow"}
    assert {e.name for e in reg.entries(now=60.1)} == {"slow"}
    assert len(reg) == 1, "an expired report is dropped, not only hidden"
    assert {e.name for e in reg.entries(now=300.1)} == set()
    assert len(reg) == 0


def test_expired_names_make_room_for_new_ones() -> None:
    reg = LbRegistry(limit=2, min_expiry_s=60.0)
    reg.put("a", REPORT, now=0.0)
    reg.put("b", REPORT, now=50.0)
    with pytest.raises(TooManyLbs):
        reg.put("c", REPORT, now=55.0)
    reg.put("c", REPORT, now=61.0)  # "a" expired at 60
    assert [e.name for e in reg.entries(now=61.0)] == ["b", "c"]


def test_in_sync_when_the_current_revision_is_applied_and_ok() -> None:
    reg = LbRegistry()
    entry = reg.put("lb", REPORT, now=0.0)
    view = entry.view(AT_7, now=1.0)
    assert (view.state, view.lag_revisions) == ("in-sync", 0)
    # A revision newer than this agent's (it lags the others by a moment) is in sync too.
    ahead = reg.put("lb", replace(REPORT, applied_revision=8), now=0.0)
    assert (ahead.view(AT_7, now=1.0).state, ahead.view(AT_7, now=1.0).lag_revisions) == ("in-sync", 0)


def test_behind_is_applying_within_the_grace_then_lagging() -> None:
    entry = LbRegistry().put("lb", replace(REPORT, applied_revision=5), now=0.0)
    # The current decision was committed 9 s ago: within 2 heartbeats (10 s).
    young = Current(revision=7, epoch="e1", age_s=9.0)
    assert (entry.view(young, now=1.0).state, entry.view(young, now=1.0).lag_revisions) == ("applying", 2)
    old = Current(revision=7, epoch="e1", age_s=11.0)
    assert (entry.view(old, now=1.0).state, entry.view(old, now=1.0).lag_revisions) == ("lagging", 2)


def test_an_lb_that_applied_nothing_of_this_epoch_is_behind_by_every_revision() -> None:
    reg = LbRegistry()
    other_epoch = reg.put("lb", replace(REPORT, applied_revision=500, applied_epoch="old"), now=0.0)
    view = other_epoch.view(AT_7, now=1.0)
    assert (view.state, view.lag_revisions) == ("lagging", 7)
    nothing = reg.put("lb", replace(REPORT, applied_revision=None, applied_epoch=None, ok=None), now=0.0)
    view = nothing.view(AT_7, now=1.0)
    assert (view.state, view.lag_revisions) == ("lagging", 7)


def test_a_decision_without_an_epoch_matches_a_report_without_one() -> None:
    entry = LbRegistry().put("lb", replace(REPORT, applied_epoch=None), now=0.0)
    view = entry.view(Current(revision=7, epoch="", age_s=100.0), now=1.0)
    assert (view.state, view.lag_revisions) == ("in-sync", 0)


@pytest.mark.parametrize(
    "change",
    [{"ok": False}, {"error": "HAProxy runtime API unreachable"}, {"ok": False, "error": "nginx -t failed"}],
)
def test_failing_when_not_ok_or_with_an_error(change: dict[str, object]) -> None:
    entry = LbRegistry().put("lb", replace(REPORT, **change), now=0.0)  # type: ignore[arg-type]
    view = entry.view(AT_7, now=1.0)
    assert view.state == "failing"
    assert view.ok_metric == 0


def test_silent_after_three_heartbeats_without_a_report_whatever_it_said() -> None:
    reg = LbRegistry()
    entry = reg.put("lb", replace(REPORT, ok=False), now=0.0)
    assert entry.view(AT_7, now=14.9).state == "failing"
    assert entry.view(AT_7, now=15.1).state == "silent"


def test_no_decision_on_this_agent_means_nothing_to_lag() -> None:
    entry = LbRegistry().put("lb", REPORT, now=0.0)
    view = entry.view(Current(revision=None, epoch="", age_s=None), now=1.0)
    assert view.lag_revisions is None
    assert view.state == "in-sync"


def test_the_json_view_has_the_documented_fields() -> None:
    entry = LbRegistry().put("lb", replace(REPORT, applied_revision=6), now=10.0)
    body = entry.view(AT_7, now=12.5).to_json()
    assert list(body) == [
        "name",
        "adapter",
        "applied_revision",
        "applied_epoch",
        "applied_at",
        "desired_revision",
        "reported_at",
        "age_s",
        "ok",
        "error",
        "heartbeat_s",
        "lag_revisions",
        "state",
    ]
    assert body["name"] == "lb" and body["reported_at"] == 10.0 and body["age_s"] == 2.5
    assert body["lag_revisions"] == 1 and body["state"] == "lagging"


def test_the_ok_metric_is_absent_before_anything_was_applied() -> None:
    entry = LbRegistry().put("lb", replace(REPORT, ok=None, applied_revision=None), now=0.0)
    assert entry.view(AT_7, now=1.0).ok_metric is None
    assert LbRegistry().put("lb", REPORT, now=0.0).view(AT_7, now=1.0).ok_metric == 1
