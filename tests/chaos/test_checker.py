"""The checker's own tests: hand-made histories, one planted violation of each kind.

A checker that cannot fail is no checker: each test starts from a clean history (which
must pass), plants exactly one fault of the product in it, and asserts that the checker
names that kind, the agent and the step.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane.testing.chaos.checker import KINDS, check, percentiles, shape_problems
from controlplane.testing.chaos.history import (
    AgentFinal,
    Fault,
    History,
    Params,
    Read,
    Write,
    content_hash,
    dumps,
    loads,
)
from controlplane.testing.chaos.runner import at_rest

AGENTS = ["a1", "a2", "a3"]
REGIONS = ["east", "south", "north"]
BASE = {"east": 40, "south": 33, "north": 27}
T0 = 1000.0  # the agents started
F0 = 1010.0  # the fault phase began


def decision(
    revision: int,
    weights: dict[str, int] | None = None,
    *,
    states: dict[str, str] | None = None,
    intent_seq: int = 0,
    committed_at: float | None = None,
    panic: bool = False,
) -> dict[str, Any]:
    weights = weights or BASE
    states = states or {}
    return {
        "revision": revision,
        "epoch": "",
        "term": 1,
        "committed_at_unix": committed_at if committed_at is not None else 5000.0 + revision,
        "panic": panic,
        "panic_services": ["order"] if panic else [],
        "frozen": False,
        "shed_fraction": 0.0,
        "services": {
            "order": {r: {"weight": w, "state": states.get(r, "healthy")} for r, w in weights.items()}
        },
        "features": {"comments": True},
        "intent_seq": intent_seq,
    }


class Builder:
    """A history of three agents on loopback, built read by read."""

    def __init__(self) -> None:
        self.h = History(
            seed=42,
            backend="raft",
            agents=list(AGENTS),
            regions=list(REGIONS),
            services=["order"],
            schedule={},
            params=Params(
                detection_window_s=1.4,
                commit_slack_s=3.0,
                settle_s=6.0,
                fresh_lag_s=3.0,
                read_grace_s=8.0,
                read_outage_s=3.0,
                write_settle_s=5.0,
                observer_quorum=2,
            ),
            baseline={"order": dict(BASE)},
            started=T0,
            faults_from=F0,
            healed_at=F0 + 40,
            ended=F0 + 60,
            converged_at=F0 + 45,
            reads=[],
            contents={},
            writes=[],
            faults=[],
            final={},
            truncated=False,
            notes=[],
        )

    def serve(
        self,
        agent: str,
        at: float,
        d: dict[str, Any] | None,
        *,
        stale: bool = False,
        status: int = 200,
        until: float | None = None,
        source: str = "poll",
    ) -> None:
        """`agent` served `d` (or answered `status`) from `at` to `until` (one merged record)."""
        digest = None
        if d is not None:
            digest = content_hash(d)
            self.h["contents"][digest] = d
        end = until if until is not None else at
        self.h["reads"].append(
            Read(
                agent=agent,
                source=source,
                status=status if d is None else 200,
                epoch=None if d is None else d["epoch"],
                revision=None if d is None else d["revision"],
                stale=None if d is None else stale,
                content=digest,
                intent_seq=None if d is None else d["intent_seq"],
                first_lo=at - 0.01,
                first_hi=at,
                last_lo=end - 0.01,
                last_hi=end,
                count=max(1, round((end - at) / 0.1)),
            )
        )

    def fault(self, at: float, step: int, action: str, episode: int = 1, **resolved: Any) -> None:
        self.h["faults"].append(
            Fault(at=at, step=step, episode=episode, action=action, args={}, resolved=dict(resolved))
        )

    def write(self, agent: str, sent: float, status: int, answer: Any, received: float | None = None) -> None:
        self.h["writes"].append(
            Write(
                step=0,
                tag="t",
                agent=agent,
                method="POST",
                path="/v1/intents",
                body={"kind": "drain", "region": "north", "reason": "test"},
                client_id=None,
                retry=False,
                sent=sent,
                received=received if received is not None else sent + 0.05,
                status=status,
                answer=answer,
            )
        )

    def finals(self, intent_ids: list[str]) -> None:
        committed = {str(d["revision"]): d["committed_at_unix"] for d in self.h["contents"].values()}
        for agent in AGENTS:
            self.h["final"][agent] = AgentFinal(
                reachable=True, decisions=dict(committed), intent_ids=list(intent_ids), history_complete=True
            )


def clean() -> Builder:
    """Revisions 1..4 served by every agent, an intent acknowledged at revision 3, then
    a region down and out, then back, converged at revision 6 with base weights."""
    b = Builder()
    drained = {"east": 55, "south": 45, "north": 0}
    for i, agent in enumerate(AGENTS):
        lag = 0.02 * i
        b.serve(agent, T0 + 5 + lag, decision(1), until=F0 + 1)
        b.serve(agent, F0 + 2 + lag, decision(2), until=F0 + 3)
        b.serve(agent, F0 + 4 + lag, decision(3, drained, states={"north": "drained"}, intent_seq=1))
        b.serve(agent, F0 + 5 + lag, decision(4, intent_seq=2), until=F0 + 12)
        # east's order refuses at F0+10; out by F0+12 on every agent.
        b.serve(agent, F0 + 12.5 + lag, decision(5, {"east": 0, "south": 55, "north": 45}, intent_seq=2))
        b.serve(agent, F0 + 41 + lag, decision(6, intent_seq=2), until=F0 + 60)
    b.write("a2", F0 + 3.9, 201, {"id": "i1", "seq": 1, "revision": 3})
    b.write("a3", F0 + 4.9, 201, {"id": "i2", "seq": 2, "revision": 4})
    b.fault(F0 + 10, 5, "backend", episode=2, backends={"east/order": "refuse"})
    b.fault(F0 + 30, 9, "backend_heal", episode=2, backends={"east/order": "up"})
    b.finals(["i1", "i2"])
    return b


def kinds_of(h: History) -> set[str]:
    return {v["kind"] for v in check(h)["violations"]}


def test_a_clean_history_passes_and_measures() -> None:
    report = check(clean().h)
    assert report["violations"] == []
    assert report["stats"]["converged_after_s"] == pytest.approx(1.04)
    assert report["latencies"]["backend refuse -> out"] == [pytest.approx(2.5)]


def test_a_history_survives_json() -> None:
    h = clean().h
    assert check(loads(dumps(h))) == check(h)


def test_agreement_two_contents_for_one_revision() -> None:
    b = clean()
    b.serve("a2", F0 + 5.5, decision(4, {"east": 50, "south": 30, "north": 20}, intent_seq=2))
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "agreement"]
    assert len(found) == 1
    assert "revision 4 served with 2 contents" in found[0]["detail"]
    assert found[0]["seed"] == 42


def test_serving_metadata_is_not_content() -> None:
    """The same decision marked stale by one agent is the same content."""
    b = clean()
    b.serve("a3", F0 + 13, decision(5, {"east": 0, "south": 55, "north": 45}, intent_seq=2), stale=True)
    assert "agreement" not in kinds_of(b.h)


def test_uncommitted_a_ghost_commit_nobody_else_saw() -> None:
    b = clean()
    # a1 serves a revision 7 that the cluster's history holds with another commit time.
    ghost = decision(7, {"east": 10, "south": 60, "north": 30}, intent_seq=2, committed_at=9999.0)
    b.serve("a1", F0 + 50, ghost)
    for final in b.h["final"].values():
        final["decisions"]["7"] = 7777.0
    kinds = kinds_of(b.h)
    assert "uncommitted" in kinds
    assert "agreement" not in kinds


def test_monotonic_lower_revision_after_restart() -> None:
    b = clean()
    b.fault(F0 + 13, 6, "kill", episode=3, stopped=["a2"])
    b.fault(F0 + 14, 7, "restart", episode=3, started=["a2"])
    b.serve("a2", F0 + 15, decision(4, intent_seq=2), stale=True)
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "monotonic"]
    assert [v["agent"] for v in found] == ["a2"]
    assert found[0]["step"] == 7
    assert "revision 4 (stale, poll) after revision 5" in found[0]["detail"]


def test_monotonic_needs_real_time_order() -> None:
    """A poll sent before a newer event arrived may carry the older revision: no violation."""
    b = clean()
    r = b.h["reads"]
    b.serve("a1", F0 + 12.55, decision(4, intent_seq=2))
    r[-1]["first_lo"] = r[-1]["last_lo"] = F0 + 12.4  # sent before revision 5 arrived
    assert "monotonic" not in kinds_of(b.h)


def test_fresh_lag_old_revision_served_as_fresh() -> None:
    b = clean()
    b.h["reads"] = [r for r in b.h["reads"] if not (r["agent"] == "a3" and r["revision"] == 5)]
    # a3 stays on revision 4 (fresh!) until F0+20 while revision 5 appeared at F0+12.5.
    b.serve("a3", F0 + 12.1, decision(4, intent_seq=2), until=F0 + 20)
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "fresh_lag"]
    assert [v["agent"] for v in found] == ["a3"]
    assert "1 revision(s) behind" in found[0]["detail"]


def test_fresh_lag_is_fine_when_marked_stale() -> None:
    b = clean()
    b.h["reads"] = [r for r in b.h["reads"] if not (r["agent"] == "a3" and r["revision"] == 5)]
    b.serve("a3", F0 + 12.1, decision(4, intent_seq=2), until=F0 + 20, stale=True)
    assert "fresh_lag" not in kinds_of(b.h)


@pytest.mark.parametrize(
    ("weights", "states", "problem"),
    [
        ({"east": 40, "south": 33, "north": 26}, {}, "sum to 99"),
        ({"east": 40.5, "south": 33, "north": 26.5}, {}, "not integers"),
        ({"east": 40, "south": 33, "north": 27}, {"north": "drained"}, "drained but given weight 27"),
        ({"east": 0, "south": 0, "north": 0}, {}, "no weight anywhere"),
    ],
)
def test_validity_shape(weights: dict[str, Any], states: dict[str, str], problem: str) -> None:
    b = clean()
    b.serve("a1", F0 + 50, decision(7, weights, states=states, intent_seq=2))
    b.serve("a2", F0 + 50, decision(7, weights, states=states, intent_seq=2))
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "validity"]
    assert found and problem in found[0]["detail"]


def test_validity_weight_to_a_dead_region() -> None:
    b = clean()
    # a1 never takes east out: it keeps revision 4's weights fresh, long after the fault.
    b.h["reads"] = [r for r in b.h["reads"] if not (r["agent"] == "a1" and r["revision"] == 5)]
    b.serve("a1", F0 + 12.1, decision(4, intent_seq=2), until=F0 + 20)
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "validity"]
    assert found, report["violations"]
    assert "order/east weight 40" in found[0]["detail"] and found[0]["step"] == 5


def test_dead_region_is_allowed_in_panic_and_without_majority() -> None:
    b = clean()
    b.h["reads"] = [r for r in b.h["reads"] if not (r["agent"] == "a1" and r["revision"] == 5)]
    b.serve("a1", F0 + 14, decision(4, intent_seq=2, panic=True), until=F0 + 20)
    assert "validity" not in kinds_of(b.h)
    b = clean()
    # Two of three agents stopped: nobody can decide anything; a1 serving old weights is fine
    # (as far as validity goes; it must say stale, which fresh_lag judges).
    b.fault(F0 + 9, 4, "pause", episode=3, paused=["a2", "a3"])
    b.h["reads"] = [r for r in b.h["reads"] if r["revision"] != 5]
    for r in b.h["reads"]:
        if r["revision"] == 6:
            r["first_lo"] = r["last_lo"] = r["first_hi"] = r["last_hi"] = F0 + 41
    b.serve("a1", F0 + 12.1, decision(4, intent_seq=2), until=F0 + 20, stale=True)
    assert "validity" not in kinds_of(b.h)


def test_convergence_an_agent_left_behind() -> None:
    b = clean()
    b.serve("a3", F0 + 59.5, decision(6, intent_seq=2), stale=True, until=F0 + 60.5)
    report = check(b.h)
    found = [v for v in report["violations"] if v["kind"] == "convergence"]
    assert found and "a3 serves revision 6 stale" in found[0]["detail"]


def test_convergence_is_judged_as_the_quiet_period_ended() -> None:
    """What an agent answered after `ended` (while the runner collects its finals) is not
    the end state; what it answered up to then is."""
    b = clean()
    b.serve("a3", F0 + 60.7, decision(6, intent_seq=2), stale=True, until=F0 + 61.2)
    assert "convergence" not in kinds_of(b.h)
    b.serve("a2", F0 + 59.9, decision(6, intent_seq=2), stale=True, until=F0 + 61.2)
    assert "convergence" in kinds_of(b.h)


def test_convergence_weights_not_back_to_base() -> None:
    b = clean()
    for agent in AGENTS:
        weights = {"east": 30, "south": 40, "north": 30}
        b.serve(agent, F0 + 59.5, decision(7, weights, intent_seq=2), until=F0 + 60.5)
    b.finals(["i1", "i2"])
    found = [v for v in check(b.h)["violations"] if v["kind"] == "convergence"]
    assert found and "base" in found[0]["detail"]


def test_the_baseline_is_a_decision_at_rest() -> None:
    """Convergence is judged against the baseline, so the runner takes it only from a
    decision at rest: 5 agents, seed 37 took it mid-recovery (a held region at weight 0,
    then ramping) and reported the real base weights as not converged."""
    assert at_rest(decision(4))
    held = decision(5, {"east": 0, "south": 0, "north": 100}, states={"east": "down", "south": "down"})
    assert not at_rest(held)
    ramping = decision(6, {"east": 21, "south": 18, "north": 61})
    ramping["services"]["order"]["east"]["ramp"] = 0.25
    assert not at_rest(ramping)
    assert not at_rest(decision(4, panic=True))
    assert not at_rest({**decision(4), "shed_fraction": 0.39})
    assert not at_rest({**decision(4), "features": {"comments": False}})
    assert not at_rest({**decision(4), "stale": True})
    assert not at_rest(None)


def test_intent_not_carried_by_a_later_revision() -> None:
    b = clean()
    b.serve("a2", F0 + 13, decision(5, {"east": 0, "south": 55, "north": 45}, intent_seq=1))
    kinds = kinds_of(b.h)
    assert "intent_visible" in kinds


def test_intent_lost_at_the_end() -> None:
    b = clean()
    b.h["final"]["a3"]["intent_ids"] = ["i1"]
    found = [v for v in check(b.h)["violations"] if v["kind"] == "intent_lost"]
    assert [(v["agent"], "intent i2" in v["detail"]) for v in found] == [("a3", True)]


def test_read_availability_an_agent_up_that_does_not_answer() -> None:
    b = clean()
    b.serve("a2", F0 + 20, None, status=0, until=F0 + 25)
    found = [v for v in check(b.h)["violations"] if v["kind"] == "read_availability"]
    assert [v["agent"] for v in found] == ["a2"]


def test_read_availability_needs_the_recorder_to_keep_its_pace() -> None:
    """Polls time out after 1 s and follow at once: an agent that hangs fails about one
    poll a second (judged); 2 polls in 5.1 s mean the recorder was held up, not the agent
    (5 agents seed 50, where another agent's poll failed at the same instant)."""
    b = clean()
    b.serve("a2", F0 + 20, None, status=0, until=F0 + 25.1)
    b.h["reads"][-1]["count"] = 4
    assert [v["agent"] for v in check(b.h)["violations"] if v["kind"] == "read_availability"] == ["a2"]
    b.h["reads"][-1]["count"] = 2
    assert "read_availability" not in kinds_of(b.h)


def test_read_availability_not_judged_while_stopped() -> None:
    b = clean()
    b.fault(F0 + 19, 8, "pause", episode=4, paused=["a2"])
    b.fault(F0 + 26, 9, "resume", episode=4, resumed=["a2"])
    b.serve("a2", F0 + 20, None, status=0, until=F0 + 25)
    assert "read_availability" not in kinds_of(b.h)


def test_write_availability_refused_with_a_connected_majority() -> None:
    b = clean()
    b.write("a1", F0 + 20, 503, {"error": "no leader"}, received=F0 + 21)
    found = [v for v in check(b.h)["violations"] if v["kind"] == "write_availability"]
    assert [v["agent"] for v in found] == ["a1"]


def test_write_availability_not_judged_in_a_minority() -> None:
    b = clean()
    cut = [[a, o] for a in ("a1",) for o in ("a2", "a3")] + [[o, "a1"] for o in ("a2", "a3")]
    b.fault(F0 + 19, 8, "partition", episode=4, cut=cut)
    b.write("a1", F0 + 20, 503, {"error": "no leader"}, received=F0 + 21)
    assert "write_availability" not in kinds_of(b.h)
    b = clean()
    b.write("a1", F0 + 20, 409, {"error": "unsafe"})
    assert "write_availability" not in kinds_of(b.h)


def test_write_availability_not_judged_across_a_change_in_flight() -> None:
    """A partition while the write is in flight may cut its leader off: "retry" is fair."""
    b = clean()
    b.fault(F0 + 20.2, 8, "partition", episode=4, cut=[["a2", "a3"], ["a3", "a2"]])
    b.write("a1", F0 + 20, 503, {"error": "leadership changed"}, received=F0 + 20.6)
    assert "write_availability" not in kinds_of(b.h)


def test_write_availability_not_judged_right_after_the_agent_started() -> None:
    """Like reads: an agent restarted 5 s ago may not listen yet (etcd, seed 11)."""
    b = clean()
    b.fault(F0 + 15, 8, "kill", episode=4, stopped=["a1"])
    b.fault(F0 + 15.1, 9, "restart", episode=4, started=["a1"])
    b.write("a1", F0 + 20.1, 0, {"error": "ClientConnectorError"})
    assert "write_availability" not in kinds_of(b.h)
    # Past the grace, the same failure is judged.
    b.write("a1", F0 + 23.2, 0, {"error": "ClientConnectorError"})
    found = [v for v in check(b.h)["violations"] if v["kind"] == "write_availability"]
    assert [(v["agent"], v["at"] > 8.0) for v in found] == [("a1", True)]


def test_crash_an_agent_that_exits_by_itself() -> None:
    b = clean()
    b.fault(F0 + 20, -1, "crashed", episode=0, agent="a2", stopped=["a2"], exit_code=1)
    b.h["faults"][-1]["note"] = "Traceback ...\nRuntimeError: boom"
    found = [v for v in check(b.h)["violations"] if v["kind"] == "crash"]
    assert [v["agent"] for v in found] == ["a2"] and "boom" in found[0]["detail"]


def test_every_kind_has_a_planted_test() -> None:
    """The list above covers every invariant the checker knows."""
    planted = {
        "crash",
        "agreement",
        "uncommitted",
        "monotonic",
        "fresh_lag",
        "validity",
        "convergence",
        "intent_visible",
        "intent_lost",
        "read_availability",
        "write_availability",
    }
    assert planted == set(KINDS)


def test_shape_problems_of_a_good_decision() -> None:
    assert shape_problems(decision(1)) == []
    assert shape_problems({}) == ["no services"]


def test_percentiles() -> None:
    assert percentiles([]) == {}
    p = percentiles([float(x) for x in range(1, 21)])
    assert (p["min"], p["median"], p["p95"], p["max"]) == (1.0, 10.5, 19.0, 20.0)


def test_the_checker_does_not_change_its_input() -> None:
    h = clean().h
    before = copy.deepcopy(h)
    check(h)
    assert h == before
