"""The behaviour every consensus backend must show (the contract in `consensus/base.py`).

Each test runs against every backend in `conftest.BACKENDS`, on a real cluster on
loopback. Nothing here knows which backend it is talking to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from controlplane.consensus import ControlStore
from controlplane.errors import Conflict, NotFound, NotLeader, Rejected
from controlplane.model import Decision, Intent, IntentKind, Observation, Placement, State
from controlplane.state import DRILLS_LIMIT, HISTORY_LIMIT, ControlState, DrillRecord, StoreStatus

from .conftest import ClusterFactory, eventually


def make_decision(
    revision: int, member: StoreStatus | ControlStore, *, east_weight: int = 50, epoch: str | None = None
) -> Decision:
    """A decision stamped by `member` (a store, or a status seen earlier), in its term and epoch.

    Given a store, the decision carries the epoch of the store's state; given a status,
    `epoch` (none when not given).
    """
    if isinstance(member, ControlStore):
        status, epoch = member.status(), member.state().epoch if epoch is None else epoch
    else:
        status = member
    return Decision(
        revision=revision,
        services={
            "order": {
                "cn-east": Placement(weight=east_weight, state=State.HEALTHY),
                "cn-south": Placement(weight=100 - east_weight, state=State.HEALTHY),
            }
        },
        features={"comments": True},
        reasons=(f"revision {revision} for the test",),
        term=status.term,
        leader=status.member_id,
        committed_at=time.time(),
        epoch=epoch or "",
    )


def drain(intent_id: str, region: str = "cn-east", service: str | None = None) -> Intent:
    return Intent(
        id=intent_id,
        kind=IntentKind.DRAIN,
        reason="maintenance",
        who="alice",
        region=region,
        service=service,
        created_at=time.time(),
    )


def undrain(intent_id: str, region: str = "cn-east") -> Intent:
    return Intent(id=intent_id, kind=IntentKind.UNDRAIN, reason="done", who="alice", region=region)


def drill_result(drill_id: str, rto_s: float | None = 41.2, region: str = "cn-east") -> DrillRecord:
    return DrillRecord(
        id=drill_id,
        region=region,
        service=None,
        who="alice",
        started_at=1000.0,
        ended_at=1120.0,
        objective_s=90.0,
        rto_s=rto_s,
        passed=rto_s is not None and rto_s <= 90.0,
        stages={"decision_committed": 2.5, "served": 2.9, "applied": rto_s},
        late_lbs=() if rto_s is not None else ("haproxy-east",),
        summary="a drill for the test",
    )


def seen(store: ControlStore) -> tuple[object, ...]:
    """What a reader of `store` can see, for checking that nothing changed."""
    s = store.state()
    return (s.version, s.decision, dict(s.intents), s.intent_seq, dict(s.observations), s.history, s.drills)


async def test_decision_committed_on_leader_is_visible_on_every_member(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    leader_id, leader = cluster.leader()

    decision = make_decision(1, leader)
    committed = await leader.commit_decision(decision)

    assert committed == decision
    await cluster.converged(lambda s: s.decision == decision, what="decision 1")
    for store in cluster.stores.values():
        state = store.state()
        assert state.version > 0
        assert (state.history[-1].kind, state.history[-1].revision) == ("decision", 1)
        status = store.status()
        assert status.leader == leader_id
        assert status.has_quorum
        assert status.quorum_lost_at is None
        assert status.term == leader.status().term
        assert sorted(m.id for m in status.members) == ["m0", "m1", "m2"]
        assert all(m.connected for m in status.members)
    await eventually(
        lambda: all(s.status().commit_index > 0 for s in cluster.stores.values()), what="commit index"
    )


async def test_commit_with_wrong_revision_conflicts_and_changes_nothing(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    with pytest.raises(Conflict):
        await leader.commit_decision(make_decision(0, leader))
    first = make_decision(1, leader)
    await leader.commit_decision(first)
    await cluster.converged(lambda s: s.decision == first)
    before = {m: seen(s) for m, s in cluster.stores.items()}

    for revision in (1, 3, 7):
        with pytest.raises(Conflict):
            await leader.commit_decision(make_decision(revision, leader, east_weight=10))

    await asyncio.sleep(0.2)  # a wrongly applied write would have reached the followers by now
    assert {m: seen(s) for m, s in cluster.stores.items()} == before
    assert leader.state().decision == first


async def test_commit_on_a_follower_or_in_another_term_is_not_the_leaders(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    leader_id, leader = cluster.leader()
    follower = cluster.followers()[0]
    before = {m: seen(s) for m, s in cluster.stores.items()}

    with pytest.raises(NotLeader) as from_follower:
        await follower.commit_decision(make_decision(1, follower))
    assert from_follower.value.leader == leader_id

    current = make_decision(1, leader)
    stale = dataclasses.replace(current, term=current.term - 1)
    with pytest.raises(NotLeader):
        await leader.commit_decision(stale)

    await asyncio.sleep(0.2)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before


async def test_intents_from_a_follower_drain_undrain_and_apply_once(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    follower, other = cluster.followers()

    committed = await follower.submit_intent(drain("drain-east"))

    assert (committed.id, committed.seq, committed.region) == ("drain-east", 1, "cn-east")
    await cluster.converged(lambda s: dict(s.intents) == {"drain-east": committed} and s.intent_seq == 1)

    # The same id again (a client retrying after a timeout), from another member: applied once.
    again = await other.submit_intent(drain("drain-east"))
    assert again == committed
    await asyncio.sleep(0.1)
    assert all(s.state().intent_seq == 1 for s in cluster.stores.values())

    cleared = await follower.submit_intent(undrain("undrain-east"))
    assert cleared.seq == 2
    await cluster.converged(lambda s: not s.intents and s.intent_seq == 2, what="drain cleared")
    kinds = [(h.kind, h.intent_id) for h in follower.state().history]
    assert kinds[-2:] == [("intent", "drain-east"), ("intent", "undrain-east")]

    before = {m: seen(s) for m, s in cluster.stores.items()}
    with pytest.raises(Rejected):
        await other.submit_intent(undrain("undrain-again"))
    await asyncio.sleep(0.2)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before


async def test_delete_intent_removes_it_everywhere(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    follower = cluster.followers()[0]
    feature = Intent(
        id="comments-off",
        kind=IntentKind.FEATURE,
        reason="load",
        who="bob",
        feature="comments",
        enabled=False,
    )
    kept = await leader.submit_intent(drain("drain-south", region="cn-south"))
    submitted = await leader.submit_intent(feature)

    removed = await follower.delete_intent("comments-off", who="carol", reason="load is back")

    assert removed == submitted
    await cluster.converged(lambda s: dict(s.intents) == {"drain-south": kept}, what="intent removed")
    last = follower.state().history[-1]
    assert (last.kind, last.intent_id, last.who) == ("intent-removed", "comments-off", "carol")
    assert follower.state().intent_seq > submitted.seq  # the next decision can say it saw the removal

    # A retried removal (its answer was lost) is answered as the first was, changing nothing.
    before = {m: seen(s) for m, s in cluster.stores.items()}
    assert await leader.delete_intent("comments-off", who="carol", reason="again") == submitted
    await asyncio.sleep(0.1)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before

    # An intent that never stood, or was replaced rather than removed, is not found.
    with pytest.raises(NotFound):
        await leader.delete_intent("never-was", who="carol", reason="typo")
    replaced = await leader.submit_intent(drain("drain-south-2", region="cn-south"))
    await cluster.converged(lambda s: "drain-south-2" in s.intents)
    assert replaced.id != kept.id
    with pytest.raises(NotFound):
        await leader.delete_intent("drain-south", who="carol", reason="replaced")


async def test_a_drill_recorded_on_one_member_is_visible_on_every_member_once(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    follower, other = cluster.followers()

    stored = await follower.record_drill(drill_result("drill-east-1"))

    assert stored == dataclasses.replace(drill_result("drill-east-1"), recorded_at=stored.recorded_at)
    assert stored.recorded_at > 0  # stamped by the store
    await cluster.converged(lambda s: s.drills == (stored,), what="the drill")
    for store in cluster.stores.values():
        last = store.state().history[-1]
        assert (last.kind, last.intent_id, last.who) == ("drill", "drill-east-1", "alice")
        assert last.summary == "drill of cn-east by alice: RTO 41.2 s, objective 90 s: passed"

    # The same id again (cpctl retrying after a timeout), from another member: kept once,
    # as first recorded, whatever the retry says.
    before = {m: seen(s) for m, s in cluster.stores.items()}
    again = await other.record_drill(drill_result("drill-east-1", rto_s=None))
    assert again == stored
    await asyncio.sleep(0.2)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before

    # A record that contradicts itself is refused and changes nothing.
    with pytest.raises(Rejected):
        await other.record_drill(dataclasses.replace(drill_result("drill-bad"), rto_s=None, passed=True))
    await asyncio.sleep(0.2)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before


async def test_drills_are_bounded_to_the_newest(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    follower = cluster.followers()[0]
    total = DRILLS_LIMIT + 3

    for i in range(total):
        await (leader if i % 2 else follower).record_drill(drill_result(f"drill-{i:04}"))

    newest = [f"drill-{i:04}" for i in range(total - DRILLS_LIMIT, total)]
    await cluster.converged(lambda s: [d.id for d in s.drills] == newest, what="the newest drills")
    # Every member holds the same records, stamps included.
    first, *others = [s.state().drills for s in cluster.stores.values()]
    assert all(o == first for o in others)


async def test_observations_are_replaced_per_observer(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    m0, m1 = cluster.store("m0"), cluster.store("m1")

    def obs(observer: str, region: str, up: bool, at: float) -> Observation:
        return Observation(observer=observer, region=region, service="order", up=up, at=at)

    await m0.publish_observations("m0", [obs("m0", "cn-east", True, 1.0), obs("m0", "cn-south", True, 1.0)])
    # m1 speaks only for itself: the entry claiming to be m0's is dropped.
    await m1.publish_observations("m1", [obs("m1", "cn-east", False, 2.0), obs("m0", "cn-south", False, 2.0)])
    await m0.publish_observations("m0", [obs("m0", "cn-east", False, 3.0)])

    expected = {
        ("m0", "cn-east", "order"): obs("m0", "cn-east", False, 0.0),
        ("m0", "cn-south", "order"): obs("m0", "cn-south", True, 0.0),
        ("m1", "cn-east", "order"): obs("m1", "cn-east", False, 0.0),
    }

    def timeless(s: ControlState) -> dict[object, Observation]:
        return {k: dataclasses.replace(o, at=0.0) for k, o in s.observations.items()}

    await cluster.converged(lambda s: timeless(s) == expected, what="observations")
    # Stamped by the store with the cluster's clock, whatever the observer put in `at`.
    now = m0.cluster_time()
    assert now is not None
    for o in m0.state().observations.values():
        assert now - 10 < o.at <= now + 1


async def test_history_is_bounded_and_newest_last(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    last = HISTORY_LIMIT + 5

    for revision in range(1, last + 1):
        await leader.commit_decision(make_decision(revision, leader))

    def full(s: ControlState) -> bool:
        return bool(s.history) and s.history[-1].revision == last

    await cluster.converged(full, what="the last decision in history")
    for store in cluster.stores.values():
        history = store.state().history
        assert len(history) == HISTORY_LIMIT
        assert [h.revision for h in history] == list(range(last - HISTORY_LIMIT + 1, last + 1))


async def test_wait_for_change_wakes_on_change_and_times_out_otherwise(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    watcher = cluster.followers()[0]
    version = watcher.state().version
    loop = asyncio.get_running_loop()

    started = loop.time()
    unchanged = await watcher.wait_for_change(version, 0.3)
    assert unchanged.version == version
    assert loop.time() - started >= 0.29

    waiting = asyncio.create_task(watcher.wait_for_change(version, 10.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    decision = make_decision(1, leader)
    started = loop.time()
    await leader.commit_decision(decision)
    changed = await asyncio.wait_for(waiting, 5.0)
    assert changed.version > version
    assert changed.decision == decision
    assert loop.time() - started < 1.0

    # Already past the version asked about: returns at once.
    started = loop.time()
    assert (await watcher.wait_for_change(version, 10.0)).version == changed.version
    assert loop.time() - started < 0.1


async def test_a_new_leader_takes_over_when_the_leader_stops(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    old_id, old = cluster.leader()
    old_status = old.status()
    first = make_decision(1, old)
    await old.commit_decision(first)
    await cluster.converged(lambda s: s.decision == first)

    await cluster.stop(old_id)
    new_id = await cluster.wait_for_leader()

    assert new_id != old_id
    new = cluster.store(new_id)
    assert new.status().term > old_status.term
    with pytest.raises(NotLeader):  # stamped in the old leader's term
        await new.commit_decision(make_decision(2, old_status))
    second = make_decision(2, new, east_weight=0)
    assert await new.commit_decision(second) == second
    await cluster.converged(lambda s: s.decision == second)

    # The old leader comes back as a follower and catches up.
    await cluster.start(old_id)
    assert await cluster.wait_for_leader() == new_id
    await cluster.converged(lambda s: s.decision == second, what="decision 2 on the returning member")


async def test_a_full_restart_recovers_decision_and_intents_from_disk(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    first = make_decision(1, leader)
    await leader.commit_decision(first)
    drained = await cluster.followers()[0].submit_intent(drain("drain-north", region="cn-north"))
    drilled = await cluster.followers()[1].record_drill(drill_result("drill-north", region="cn-north"))
    await leader.publish_observations(
        leader.status().member_id,
        [Observation(observer=leader.status().member_id, region="cn-east", service="order", up=True, at=5.0)],
    )
    await cluster.converged(
        lambda s: (
            s.decision == first
            and "drain-north" in s.intents
            and bool(s.observations)
            and s.drills == (drilled,)
        )
    )
    before = {m: seen(s) for m, s in cluster.stores.items()}

    await cluster.stop_all()
    await cluster.start_all()

    # start() returns with the state recovered, before any leader is elected.
    assert {m: seen(s) for m, s in cluster.stores.items()} == before
    new_id = await cluster.wait_for_leader()
    new = cluster.store(new_id)
    assert new.state().intents["drain-north"] == drained
    assert new.state().drills == (drilled,)
    # Still recorded once: the id is known after the restart.
    assert await new.record_drill(drill_result("drill-north", region="cn-north")) == drilled
    second = make_decision(2, new)
    await new.commit_decision(second)
    await cluster.converged(lambda s: s.decision == second)


async def test_the_state_has_one_epoch_everywhere_kept_across_restarts(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    await cluster.converged(lambda s: bool(s.epoch), what="an epoch")
    epochs = {s.state().epoch for s in cluster.stores.values()}
    assert len(epochs) == 1
    (epoch,) = epochs
    assert any(e.kind == "epoch" for e in cluster.store(cluster.leader()[0]).state().history)

    _, leader = cluster.leader()
    with pytest.raises(Conflict):  # a decision of another cluster state is refused
        await leader.commit_decision(make_decision(1, leader, epoch="someothercluster"))

    await cluster.stop_all()
    await cluster.start_all()
    await cluster.wait_for_leader()
    await cluster.converged(lambda s: s.epoch == epoch, what="the same epoch after a full restart")
