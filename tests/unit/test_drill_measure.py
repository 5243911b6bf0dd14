"""A drill's stages from what was recorded (`cpctl.drill_measure.stages`), and its report."""

from __future__ import annotations

from typing import Any

from controlplane.cpctl.drill_measure import LbSeen, Served, Timeline, stages
from controlplane.cpctl.drill_report import markdown, svg

BASE = {"order": {"cn-east": 40, "cn-south": 35, "cn-north": 25}}


def served(agent: str, revision: int, seen_at: float, east: int, verdict: str, seq: int = 1) -> Served:
    weights = {
        "order": {"cn-east": east, "cn-south": 35 + (40 - east) // 2, "cn-north": 25 + (40 - east) // 2}
    }
    return Served(
        agent=agent,
        revision=revision,
        seen_at=seen_at,
        committed_at=seen_at - 0.01 + 5.0,  # cluster time runs 5 s ahead of this machine
        intent_seq=seq,
        weights=weights,
        verdicts={"order": {"cn-east": verdict, "cn-south": "up", "cn-north": "up"}},
    )


def timeline(lbs: tuple[str, ...] = ("haproxy@a", "nginx@b"), ended_at: float | None = 160.0) -> Timeline:
    return Timeline(
        started_at=100.0,
        ended_at=ended_at,
        cluster_offset=5.0,
        drill_seq=1,
        base_revision=10,
        drilled=(("order", "cn-east"),),
        base_weights=BASE,
        agents=("a1", "a2"),
        lb_names=lbs,
    )


RECORDS = [
    served("a1", 10, 99.0, 40, "up", seq=0),  # before: not the drill's
    served("a1", 11, 100.2, 0, "down"),
    served("a2", 11, 100.5, 0, "down"),
    served("a1", 12, 160.1, 0, "up"),  # ended: held
    served("a2", 12, 160.2, 0, "up"),
    served("a1", 13, 162.0, 10, "up"),  # ramping
    served("a2", 13, 162.3, 10, "up"),
    served("a1", 14, 166.0, 40, "up"),  # full
    served("a2", 14, 166.4, 40, "up"),
]


def lb(name: str, revision: int, applied_at: float) -> LbSeen:
    return LbSeen(name, revision, applied_at, applied_at + 0.1, True, None)


def test_stages_in_order_with_the_rto_at_the_last_load_balancer() -> None:
    lbs = [
        lb("haproxy@a", 11, 100.7),
        lb("nginx@b", 11, 101.9),
        lb("haproxy@a", 13, 162.5),
        lb("nginx@b", 13, 163.0),
    ]
    s = stages(timeline(), RECORDS, lbs)
    assert s["revisions"] == {"out": 11, "back": 12, "weight_back": 13, "full_back": 14}
    assert s["committed"] == 0.19  # 100.19 on this machine's clock: the offset is applied
    assert s["served_all"] == 0.5 and s["applied_all"] == 1.9 and s["late_lbs"] == []
    assert s["back_committed"] == 0.09 and s["back_weight_all"] == 2.3
    assert s["back_applied_all"] == 3.0 and s["back_full_all"] == 6.4


def test_a_load_balancer_that_never_applies_is_late_and_there_is_no_rto() -> None:
    s = stages(timeline(), RECORDS, [lb("haproxy@a", 11, 100.7), lb("nginx@b", 10, 99.0)])
    assert s["applied_all"] is None and s["late_lbs"] == ["nginx@b"]


def test_without_load_balancers_there_are_no_lb_stages() -> None:
    s = stages(timeline(lbs=()), RECORDS, [])
    assert "applied_all" not in s and "back_applied_all" not in s
    assert s["served_all"] == 0.5


def test_a_drill_not_ended_yet_has_no_way_back() -> None:
    s = stages(timeline(ended_at=None), RECORDS, [])
    assert "back_committed" not in s and s["served_all"] == 0.5


def result(rto: float | None, passed: bool) -> dict[str, Any]:
    return {
        "region": "cn-east",
        "service": None,
        "reason": "game day",
        "who": "alice",
        "duration_s": 60.0,
        "objective_s": 90.0,
        "started_at": 100.0,
        "ended_at": 160.0,
        "ended_after_s": 60.0,
        "ended_by": "expiry",
        "intent_id": "abc",
        "rto_s": rto,
        "rto_measured_to": "every reporting load balancer",
        "passed": passed,
        "stages": stages(timeline(), RECORDS, [lb("haproxy@a", 11, 100.7)]),
        "lbs": [{"name": "haproxy@a", "adapter": "haproxy", "state": "in-sync"}, {"name": "nginx@b"}],
        "timeline": [
            {"t": r.seen_at - 100, "revision": r.revision, "weights": r.weights} for r in RECORDS[::2]
        ],
        "traffic": {"series": {"traffic": [(0.0, 120.0), (1.0, 3.0), (61.0, 118.0)]}},
        "problems": {"agent a2": "answered 503"},
    }


def test_the_report_says_the_verdict_the_late_load_balancers_and_what_was_not_watched() -> None:
    text = markdown(result(None, False), "chart.svg")
    assert "FAILED: the RTO was not reached (objective 90 s)" in text
    assert "| nginx@b | ? | ? | LATE or failed |" in text
    assert "agent a2: answered 503" in text and "![weights during the drill](chart.svg)" in text
    assert "traffic: 3 samples, min 3, max 120" in text


def test_the_chart_is_svg_with_a_line_per_region_and_the_traffic() -> None:
    chart = svg(result(1.9, True))
    assert chart.startswith("<svg") and chart.rstrip().endswith("</svg>")
    assert chart.count("<path") == 4  # three regions of order, and the traffic
    assert "PASSED: RTO 1.90 s" in chart
