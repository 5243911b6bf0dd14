"""The pure core as scripts of messages (etcd-raft style): no sockets, no sleeps."""

from __future__ import annotations

import random

import pytest

from controlplane.raft.core import CoreConfig, ProposalRefused, RaftCore, Restored
from controlplane.raft.log import LogSafetyError, RaftLog
from controlplane.raft.messages import Entry, EntryKind, HardState, Message, MsgType, Role, Snapshot
from tests.raft.corenet import CONFIG, Net


def entries(terms: list[int], start: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(start + n, t, 0.0, f"e{start + n}t{t}".encode()) for n, t in enumerate(terms))


# -- elections -------------------------------------------------------------------------------------


def test_election_by_timeout_gives_one_leader_and_followers_agree() -> None:
    net = Net()
    for _ in range(40):
        net.tick_all()
        if net.leaders():
            break
    assert len(net.leaders()) == 1
    leader = net.leaders()[0]
    term = net.cores[leader].term
    assert all(c.term == term and c.leader == leader for c in net.cores.values())
    # The new leader's empty entry commits the term everywhere, and it is not applied as data.
    net.tick_all(3)
    assert all(c.committed == 1 for c in net.cores.values())
    assert all(a == [] for a in net.applied.values())


def test_pre_vote_keeps_a_returning_partitioned_node_from_disrupting() -> None:
    net = Net()
    net.elect("n1")
    term = net.cores["n1"].term
    net.isolate("n3")
    # n3 times out again and again; with pre-vote its term does not move.
    for _ in range(100):
        net.tick("n3")
    assert net.cores["n3"].term == term
    assert net.cores["n3"].role is Role.PRE_CANDIDATE
    net.heal()
    # n3 campaigns right away on return: n2 heard from the leader recently, so refuses.
    net.cores["n3"].campaign()
    net.deliver_all()
    assert net.cores["n1"].role is Role.LEADER
    assert all(c.term == term for c in net.cores.values())
    net.tick_all(5)
    assert net.cores["n3"].leader == "n1" and net.cores["n3"].role is Role.FOLLOWER


def test_vote_is_refused_within_the_lease_even_at_a_higher_term() -> None:
    net = Net()
    net.elect("n1")
    term = net.cores["n2"].term
    vote = Message(MsgType.VOTE, "n3", "n2", term + 5, index=99, log_term=term)
    net.cores["n2"].step(vote)
    net.flush("n2")
    assert net.cores["n2"].term == term
    assert not [m for m in net.outbox if m.dst == "n3"]


def test_check_quorum_leader_steps_down_within_an_election_timeout() -> None:
    net = Net()
    net.elect("n1")
    net.isolate("n1")
    steps = 0
    while net.cores["n1"].role is Role.LEADER:
        net.tick("n1")
        net.deliver_all()
        steps += 1
        assert steps <= 2 * CONFIG.election_ticks_min
    assert net.cores["n1"].leader is None
    # The shell logs why (an SRE sees "check-quorum: no answer from n2, n3", not just a new term).
    reason = net.cores["n1"].step_down_reason
    assert reason is not None and "check-quorum" in reason and "n2" in reason and "n3" in reason
    with pytest.raises(ProposalRefused):
        net.cores["n1"].propose([b"x"], 0.0)


def test_leader_with_quorum_does_not_step_down() -> None:
    net = Net()
    net.elect("n1")
    net.tick_all(100)
    assert net.leaders() == ["n1"]


def test_candidate_with_stale_log_loses() -> None:
    restored = {
        "n1": Restored(HardState(2, None, 0), entries=entries([1, 2])),
        "n2": Restored(HardState(2, None, 0), entries=entries([1, 2, 2])),
        "n3": Restored(HardState(2, None, 0), entries=entries([1, 2, 2])),
    }
    net = Net(restored=restored)
    net.cores["n1"].campaign()
    net.deliver_all()
    assert net.cores["n1"].role is not Role.LEADER
    net.elect("n2")


# -- replication ------------------------------------------------------------------------------------


def test_log_conflict_resolution_follower_takes_the_leaders_log() -> None:
    # n3 holds an uncommitted suffix of term 2 that the leader never had.
    restored = {
        "n1": Restored(HardState(3, None, 2), entries=entries([1, 1, 3, 3])),
        "n2": Restored(HardState(3, None, 2), entries=entries([1, 1, 3])),
        "n3": Restored(HardState(3, None, 2), entries=entries([1, 1, 2, 2, 2, 2])),
    }
    net = Net(restored=restored)
    net.elect("n1")
    net.propose("n1", b"x")
    net.deliver_all()
    terms = {i: [net.cores[i].log.term(k) for k in range(1, 7)] for i in net.ids}
    assert terms["n3"] == terms["n1"] == [1, 1, 3, 3, terms["n1"][4], terms["n1"][5]]
    assert all(net.cores[i].committed == 6 for i in net.ids)
    assert net.applied["n3"][-1] == b"x"


def test_follower_commit_never_passes_what_it_verified() -> None:
    # n2 has entries 1-3 of term 1, never verified against the leader of term 2.
    core = RaftCore("n2", ["n1", "n2", "n3"], CONFIG, random.Random(1), Restored(entries=entries([1, 1, 1])))
    core.step(Message(MsgType.HEARTBEAT, "n1", "n2", 2, commit=3))
    assert core.committed == 0
    # An append that matches at 1 verifies only 1, whatever the leader's commit says.
    core.step(Message(MsgType.APP, "n1", "n2", 2, index=1, log_term=1, entries=(), commit=3))
    assert core.committed == 1
    core.step(Message(MsgType.APP, "n1", "n2", 2, index=1, log_term=1, entries=entries([1], 2), commit=3))
    assert core.committed == 2


def test_flow_control_bounds_entries_per_message_and_in_flight() -> None:
    config = CoreConfig(
        election_ticks_min=10, election_ticks_max=20, heartbeat_ticks=2, max_append_entries=4, max_inflight=2
    )
    net = Net(config=config)
    net.elect("n1")
    net.outbox.clear()
    net.propose("n1", *[b"d%d" % i for i in range(40)])
    apps = [m for m in net.outbox if m.type is MsgType.APP and m.dst == "n2"]
    assert 1 <= len(apps) <= 2
    assert all(len(m.entries) <= 4 for m in apps)
    net.deliver_all()
    assert net.applied["n2"] == [b"d%d" % i for i in range(40)]


def test_applied_entries_are_never_truncated() -> None:
    log = RaftLog(Snapshot(), entries([1, 1, 1]), committed=2, applied=2)
    with pytest.raises(LogSafetyError):
        log.maybe_append(1, 1, entries([2, 2], start=2))
    assert [log.term(i) for i in (1, 2, 3)] == [1, 1, 1]
    # Past the commit index a conflicting suffix is replaced.
    assert log.maybe_append(2, 1, entries([2], start=3)) == 3
    assert log.term(3) == 2


# -- snapshots --------------------------------------------------------------------------------------


def test_snapshot_with_matching_entry_keeps_the_log_suffix() -> None:
    core = RaftCore(
        "n2", ["n1", "n2", "n3"], CONFIG, random.Random(1), Restored(entries=entries([1, 1, 1, 1, 1]))
    )
    snap = Snapshot(3, 1, 0.0, b"state-at-3")
    core.step(Message(MsgType.SNAP, "n1", "n2", 2, snapshot=snap, commit=3))
    assert core.committed == 3
    assert core.log.last_index() == 5  # entries 4 and 5 kept (not committed)
    rd = core.ready()
    assert rd.snapshot is None
    assert [e.index for e in rd.committed] == [1, 2, 3]
    assert rd.messages[-1].type is MsgType.APP_RESP and rd.messages[-1].index == 3


def test_snapshot_without_matching_entry_discards_the_log() -> None:
    core = RaftCore(
        "n2", ["n1", "n2", "n3"], CONFIG, random.Random(1), Restored(entries=entries([1, 1, 1, 1, 1]))
    )
    snap = Snapshot(4, 2, 0.0, b"state-at-4")
    core.step(Message(MsgType.SNAP, "n1", "n2", 2, snapshot=snap, commit=4))
    assert core.committed == 4 and core.log.last_index() == 4 and core.log.term(4) == 2
    rd = core.ready()
    assert rd.snapshot == snap and rd.committed == ()
    core.advance(rd)
    assert core.applied == 4


def test_snapshot_at_or_below_commit_is_ignored() -> None:
    core = RaftCore(
        "n2",
        ["n1", "n2", "n3"],
        CONFIG,
        random.Random(1),
        Restored(HardState(1, None, 4), entries=entries([1, 1, 1, 1]), applied=4),
    )
    core.step(Message(MsgType.SNAP, "n1", "n2", 2, snapshot=Snapshot(3, 9, 0.0, b""), commit=3))
    assert core.log.term(3) == 1 and core.committed == 4


# -- ReadIndex ---------------------------------------------------------------------------------------


def test_read_index_answers_only_after_a_quorum_acks_a_later_heartbeat() -> None:
    net = Net()
    net.elect("n1")
    net.propose("n1", b"a")
    net.deliver_all()
    commit = net.cores["n1"].committed
    net.blocked = {("n1", "n3"), ("n3", "n1"), ("n1", "n2")}  # n1 hears n2 but cannot reach it
    assert net.cores["n2"].read_index(b"ctx-1")
    net.deliver_all()
    assert net.read_states["n2"] == []
    net.heal()
    net.tick("n1", CONFIG.heartbeat_ticks)  # the next heartbeat carries the request's context
    net.deliver_all()
    assert [(rs.index, rs.context) for rs in net.read_states["n2"]] == [(commit, b"ctx-1")]


def test_read_index_waits_for_a_commit_in_the_leaders_term() -> None:
    net = Net()
    net.cores["n1"].campaign()
    while net.cores["n1"].role is not Role.LEADER:
        assert net.deliver_one() is not None
    net.outbox.clear()  # its empty entry is lost: nothing of its term is committed yet
    leader = net.cores["n1"]
    assert not leader.committed_in_term()
    leader.read_index(b"early")
    net.flush("n1")
    assert not any(m.context == b"early" for m in net.outbox)
    for _ in range(10):
        net.tick_all()
    # The request was kept and answered once the term's first entry committed.
    assert leader.committed_in_term()
    assert [rs.context for rs in net.read_states["n1"]] == [b"early"]
    assert net.read_states["n1"][0].index >= 1


# -- leadership transfer --------------------------------------------------------------------------------


def test_leadership_transfer_hands_over_at_once() -> None:
    net = Net()
    net.elect("n1")
    net.propose("n1", b"a")
    term = net.cores["n1"].term
    assert net.cores["n1"].transfer_leadership("n3")
    with pytest.raises(ProposalRefused):
        net.cores["n1"].propose([b"refused during transfer"], 0.0)
    net.deliver_all()
    assert net.leaders() == ["n3"]
    assert net.cores["n3"].term == term + 1
    assert net.applied["n3"] == [b"a"]


# -- the ghost-commit scenario (issue 12 item 1) ---------------------------------------------------------


@pytest.mark.parametrize("stepped_down", [True, False], ids=["stepped-down", "still-leading"])
def test_isolated_leader_never_applies_or_commits_its_uncommitted_entries(stepped_down: bool) -> None:
    net = Net()
    net.elect("n1")
    net.propose("n1", b"agreed")
    net.deliver_all()
    net.isolate("n1")
    ghost_index = net.propose("n1", b"ghost-1", b"ghost-2")
    ghost_term = net.cores["n1"].term

    def check() -> None:
        n1 = net.cores["n1"]
        majority = net.cores["n2"]
        # Nothing n1 calls committed differs from what the majority holds at that index.
        for i in range(max(n1.log.offset + 1, 1), n1.committed + 1):
            if i <= majority.log.last_index() and i > majority.log.offset:
                assert n1.log.term(i) == majority.log.term(i), (i, n1.log.term(i))
        if n1.log.term(ghost_index) == ghost_term:
            assert n1.committed < ghost_index
        assert b"ghost-1" not in net.applied["n1"] and b"ghost-2" not in net.applied["n1"]

    net.after_step = check
    # The majority elects a new leader, commits a lot and compacts past the ghost indices.
    for _ in range(CONFIG.election_ticks_max * 2):
        net.tick("n2")
        net.tick("n3")
        net.deliver_all()
        if net.leaders() and net.leaders() != ["n1"]:
            break
    new_leader = next(i for i in net.leaders() if i != "n1")
    for k in range(30):
        net.propose(new_leader, b"majority-%d" % k)
        net.deliver_all()
    net.compact("n2")
    net.compact("n3")
    assert net.cores["n2"].log.offset > ghost_index + 1
    if stepped_down:
        net.tick("n1", 3 * CONFIG.election_ticks_min)
        assert net.cores["n1"].role is not Role.LEADER  # check-quorum
    else:
        assert net.cores["n1"].role is Role.LEADER  # still believes it leads when healed
    net.heal()
    steps = 0
    for _ in range(200):
        net.tick_all(1, deliver=False)
        while net.deliver_one() is not None:  # check() runs after every single message
            steps += 1
        if net.applied["n1"] == net.applied[new_leader]:
            break
    assert net.applied["n1"] == net.applied[new_leader]
    assert net.applied["n1"][0] == b"agreed"
    assert steps > 0


# -- damaged nodes ---------------------------------------------------------------------------------------


def test_recovering_node_neither_votes_nor_campaigns_until_caught_up() -> None:
    restored = {"n3": Restored(HardState(1, None, 0), recovering=True)}
    net = Net(restored=restored)
    n3 = net.cores["n3"]
    for _ in range(100):
        net.tick("n3")
    assert n3.role is Role.FOLLOWER and not [m for m in net.outbox if m.src == "n3"]
    vote = Message(MsgType.VOTE, "n1", "n3", 2, index=5, log_term=1)
    n3.step(vote)
    net.flush("n3")
    assert [m.reject for m in net.outbox if m.src == "n3"] == [True]
    net.outbox.clear()
    for _ in range(100):  # n1 and n2 elect a leader between them
        net.tick_all()
        if net.leaders():
            break
    assert net.leaders() and net.leaders() != ["n3"]
    net.propose(net.leaders()[0], b"a")
    net.deliver_all()
    net.tick_all(3)
    assert not n3.recovering
    assert net.applied["n3"] == [b"a"]


def test_node_that_lost_its_vote_never_votes_at_or_below_terms_it_has_seen() -> None:
    restored = {"n3": Restored(HardState(0, None, 0), entries=entries([1, 4]), vote_unknown=True)}
    net = Net(restored=restored)
    n3 = net.cores["n3"]
    assert n3.recovering and n3.term == 4
    n3.step(Message(MsgType.APP_RESP, "n1", "n3", 6))  # it has now seen term 6
    n3.recovering = False  # (as if caught up) the floor still holds
    for term in (5, 6):
        n3.step(Message(MsgType.VOTE, "n2", "n3", term, index=10, log_term=4))
    n3.step(Message(MsgType.VOTE, "n2", "n3", 7, index=10, log_term=4))
    rd = n3.ready()
    answers = [(m.term, m.reject) for m in rd.messages if m.type is MsgType.VOTE_RESP]
    assert answers[-1] == (7, False)
    assert all(reject for _, reject in answers[:-1])


# -- cluster time on entries --------------------------------------------------------------------------------


def test_entries_carry_cluster_time_and_a_new_leader_never_goes_back() -> None:
    net = Net()
    net.elect("n1")
    net.cores["n1"].propose([b"a"], 1000.0)
    net.flush("n1")
    net.deliver_all()
    e = net.cores["n2"].log.entry(2)
    assert (e.data, e.ctime, e.kind) == (b"a", 1000.0, EntryKind.NORMAL)
    net.cores["n1"].transfer_leadership("n2")
    net.deliver_all()
    noop = net.cores["n2"].log.entry(3)
    assert noop.kind is EntryKind.NOOP and noop.ctime >= 1000.0


def test_follower_that_lost_acknowledged_entries_is_resent_them() -> None:
    net = Net()
    net.elect("n1")
    for k in range(10):
        net.propose("n1", b"e%d" % k)
    net.deliver_all()
    assert net.cores["n1"].progress_of("n3").match == 11  # type: ignore[union-attr]
    # n3 restarts from a damaged journal that kept only its first 4 entries.
    kept = net.storage["n3"].entries[:4]
    net.cores["n3"] = RaftCore(
        "n3",
        net.ids,
        CONFIG,
        random.Random(3),
        Restored(HardState(net.cores["n3"].term, None, 4), entries=tuple(kept), applied=4, recovering=True),
    )
    net.applied["n3"] = net.applied["n3"][:3]
    net.applied_index["n3"] = 4
    net.tick_all(CONFIG.heartbeat_ticks * 3)
    assert net.cores["n3"].log.last_index() == 11 and net.cores["n3"].committed == 11
    assert not net.cores["n3"].recovering
    assert net.applied["n3"] == [b"e%d" % k for k in range(10)]
