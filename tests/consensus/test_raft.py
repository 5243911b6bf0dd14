"""What only the embedded Raft backend promises: authentication by the cluster secret,
snapshots and journal replay without fork, the dial override, term fencing in the state
machine, and how the engine's failures map to store errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import socket
import time

import orjson
import pytest

from controlplane.consensus import RaftStore, RaftTimings
from controlplane.consensus.raft import write_failed
from controlplane.consensus.raft_machine import (
    ControlMachine,
    decision_command,
    drill_command,
    intent_command,
)
from controlplane.errors import ConfigError, Conflict, NoQuorum, NotLeader, Rejected, StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.raft import (
    CommitTimeoutError,
    DiskFailedError,
    NoLeaderError,
    NotLeaderError,
    ProposalDroppedError,
    QueueFullError,
    RaftError,
)
from controlplane.state import ControlState

from .conftest import SECRET, Backend, ClusterFactory, RaftBackend, eventually, free_port
from .test_behaviour import drain, drill_result, make_decision, seen, undrain

# A snapshot as soon as 20 entries were applied since the last one, so a test reaches it.
COMPACTING = RaftTimings(snapshot_entries=20)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    timings = getattr(request, "param", RaftTimings())
    return RaftBackend(timings=timings)


# -- configuration ----------------------------------------------------------------------


def test_a_member_without_a_usable_secret_is_refused(tmp_path: pathlib.Path) -> None:
    for secret in ("", "short"):
        with pytest.raises(ConfigError) as refused:
            RaftStore(member_id="m0", members={"m0": "127.0.0.1:7001"}, secret=secret, data_dir=tmp_path)
        assert [p.split(":")[0] for p in refused.value.problems] == ["cluster.secret"]


def test_unusable_settings_are_all_listed(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as refused:
        RaftStore(
            member_id="m9",
            members={"m0": "127.0.0.1:7001", "m1": "nowhere"},
            secret="s",
            data_dir=tmp_path,
            timings=RaftTimings(heartbeat_s=0.2),
            dial={"m7": "127.0.0.1:1"},
        )
    fields = sorted(p.split(":")[0] for p in refused.value.problems)
    assert fields == [
        "backend.raft.heartbeat_s",
        "cluster.agents",
        "cluster.agents.m1.raft",
        "cluster.dial.m7",
        "cluster.secret",
    ]


# -- the cluster secret -----------------------------------------------------------------


async def test_a_member_with_the_wrong_secret_cannot_join_nor_write(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3, start=False)
    await cluster.start("m0")
    await cluster.start("m1")
    intruder = await cluster.start("m2", secret="not-the-" + SECRET)
    await cluster.wait_for_leader(among=["m0", "m1"])
    good = [cluster.store("m0"), cluster.store("m1")]
    await eventually(lambda: all(s.state().epoch for s in good), what="the epoch on the good members")
    before = [seen(s) for s in good]

    with pytest.raises(StoreError):
        await intruder.submit_intent(drain("intruder-drain"))
    with pytest.raises(StoreError):
        await intruder.publish_observations("m2", [Observation("m2", "cn-east", "order", up=False, at=1.0)])
    with pytest.raises(NotLeader):
        await intruder.commit_decision(make_decision(1, intruder))

    await asyncio.sleep(0.3)
    assert [seen(s) for s in good] == before
    for store in good:
        assert {m.id: m.connected for m in store.status().members}["m2"] is False
    status = intruder.status()
    assert (status.leader, status.has_quorum) == (None, False)
    assert not any(m.connected for m in status.members if m.id != "m2")

    # The good members carry on without it, and nothing reaches it.
    committed = await good[0].submit_intent(drain("real-drain"))
    await eventually(lambda: good[1].state().intents.get("real-drain") == committed, what="the drain on m1")
    await asyncio.sleep(0.2)
    assert intruder.state().version == 0
    assert not intruder.state().intents


async def test_the_cheap_quorum_answer_agrees_with_the_status(cluster_factory: ClusterFactory) -> None:
    """`quorum()` is what every read asks (is this answer stale?); the engine answers it
    without building its status, and it must say what `status()` says, with quorum and
    after losing it. (Other backends derive it from `status()`.)"""
    cluster = await cluster_factory(3)
    await cluster.wait_for_leader()
    ids = list(cluster.statuses())
    survivor = cluster.store(ids[0])

    def agree(want: bool) -> bool:
        status = survivor.status()
        return status.has_quorum is want and survivor.quorum() == (want, status.quorum_lost_at)

    await eventually(lambda: agree(True), 10, "quorum, said by both")
    assert survivor.quorum() == (True, None)
    for member_id in ids[1:]:
        await cluster.stop(member_id)
    await eventually(lambda: agree(False), 15, "no quorum, said by both")
    lost_at = survivor.quorum()[1]
    assert lost_at is not None and abs(lost_at - time.time()) < 20
    for member_id in ids[1:]:
        await cluster.start(member_id)
    await eventually(lambda: agree(True), 20, "quorum again, said by both")


# -- journal, compaction, restart -------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param(COMPACTING, id="compacting")], indirect=True)
async def test_snapshots_without_fork_then_restart_recover_the_state(
    cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fork() -> int:
        raise AssertionError("the raft backend must not fork")

    monkeypatch.setattr(os, "fork", no_fork)
    cluster = await cluster_factory(3)
    await cluster.converged(lambda s: bool(s.epoch), what="the epoch")
    leader_id, leader = cluster.leader()
    await leader.commit_decision(make_decision(1, leader))
    for i in range(3 * COMPACTING.snapshot_entries):
        observation = Observation(leader_id, "cn-east", "order", up=i % 2 == 0, at=float(i))
        await leader.publish_observations(leader_id, [observation])
    snapshots = [cluster.data_dir(m) / "snapshot" for m in cluster.member_ids]
    await eventually(lambda: all(p.exists() for p in snapshots), what="a snapshot on every member")
    # Entries after the snapshot must come back from the journal on top of it.
    await cluster.store("m1").submit_intent(drain("after-snapshot"))
    await leader.commit_decision(make_decision(2, leader))
    await cluster.converged(
        lambda s: s.decision is not None and s.decision.revision == 2 and "after-snapshot" in s.intents
    )
    before = {m: seen(s) for m, s in cluster.stores.items()}

    await cluster.stop_all()
    await cluster.start_all()

    # start() returns with the journal replayed: at least what was applied before.
    for m, s in cluster.stores.items():
        assert s.state().version >= before[m][0]
        assert s.state().decision == before[m][1]
    new_id = await cluster.wait_for_leader()
    new = cluster.store(new_id)
    third = make_decision(3, new)
    await new.commit_decision(third)
    await cluster.converged(lambda s: s.decision == third)


async def test_a_port_in_use_fails_start_cleanly(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        store = RaftStore(member_id="m0", members={"m0": address}, secret=SECRET, data_dir=tmp_path)
        with pytest.raises(StoreError):
            await store.start()
        await store.close()
        assert store.status().has_quorum is False


# -- the dial override ------------------------------------------------------------------


@dataclasses.dataclass
class Forwarder:
    """A plain TCP forwarder in front of one member, counting what goes through it."""

    target_port: int
    port: int = 0
    connections: int = 0
    bytes: int = 0
    server: asyncio.Server | None = None
    pipes: set[asyncio.StreamWriter] = dataclasses.field(default_factory=set)
    tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.pipes |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                self.bytes += len(data)
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.pipes:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


async def test_members_dialled_through_forwarders_keep_their_identity(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3, start=False)
    forwarders = {m: Forwarder(int(a.rsplit(":", 1)[1])) for m, a in cluster.addresses.items()}
    try:
        for forwarder in forwarders.values():
            await forwarder.start()
        for member in cluster.member_ids:
            dial = {m: f"127.0.0.1:{f.port}" for m, f in forwarders.items() if m != member}
            await cluster.start(member, dial=dial)
        leader_id = await cluster.wait_for_leader()
        leader = cluster.store(leader_id)
        decision = make_decision(1, leader)
        await leader.commit_decision(decision)
        await cluster.converged(lambda s: s.decision == decision)

        # Every member dials every other (identity comes from the handshake): six in all.
        assert sum(f.connections for f in forwarders.values()) >= 6
        assert sum(f.bytes for f in forwarders.values()) > 0
        for store in cluster.stores.values():
            assert all(m.connected for m in store.status().members)
            assert store.status().leader == leader_id

        # Cut the forwarders: the members lose each other, so the path really was the dial.
        for forwarder in forwarders.values():
            await forwarder.close()
        await eventually(
            lambda: not any(s.status().has_quorum for s in cluster.stores.values()),
            timeout_s=5.0,
            what="every member to notice it is cut off",
        )
        assert all(s.status().quorum_lost_at is not None for s in cluster.stores.values())
        with pytest.raises(StoreError):
            await leader.submit_intent(drain("cut-off"))
    finally:
        for forwarder in forwarders.values():
            await forwarder.close()


# -- the state machine on its own -------------------------------------------------------


def stamped(revision: int, term: int) -> Decision:
    return Decision(
        revision=revision, services={}, features={}, term=term, leader="m0", committed_at=float(revision)
    )


def test_the_machine_refuses_a_decision_appended_in_another_term() -> None:
    published: list[ControlState] = []
    machine = ControlMachine(published.append)

    assert machine.apply(1, 2, 10.0, decision_command(stamped(1, term=2))) == stamped(1, term=2)
    # The old leader of term 2 proposed it, but the entry was appended in term 3: not its term.
    late = machine.apply(2, 3, 11.0, decision_command(stamped(2, term=2)))

    assert isinstance(late, NotLeader)
    assert machine.state.decision == stamped(1, term=2)
    assert isinstance(machine.apply(3, 3, 12.0, decision_command(stamped(3, term=3))), Conflict)
    assert machine.apply(4, 3, 13.0, decision_command(stamped(2, term=3))) == stamped(2, term=3)
    assert [s.decision.revision for s in published if s.decision] == [1, 2]
    assert machine.state.version == 4


def test_the_machine_applies_an_intent_once_and_refusals_change_nothing() -> None:
    machine = ControlMachine(lambda state: None)

    first = machine.apply(1, 1, 10.0, intent_command(drain("d1")))
    again = machine.apply(2, 1, 11.0, intent_command(drain("d1")))
    cleared = machine.apply(3, 1, 12.0, intent_command(undrain("u1")))
    replayed = machine.apply(4, 1, 13.0, intent_command(undrain("u1")))  # not standing, still known
    before = machine.state
    refused = machine.apply(5, 1, 14.0, intent_command(undrain("u2")))

    assert isinstance(first, Intent) and first.seq == 1
    assert again == first
    assert isinstance(cleared, Intent) and cleared.seq == 2
    assert replayed == cleared
    assert isinstance(refused, Rejected)
    assert machine.state is before
    assert (before.version, before.intent_seq, dict(before.intents)) == (3, 2, {})
    # Times are the entries' cluster times, never a member's clock.
    assert [h.at for h in before.history] == [10.0, 12.0]


def test_observations_are_stamped_with_the_entrys_cluster_time() -> None:
    machine = ControlMachine(lambda state: None)
    skewed = Observation("m1", "cn-east", "order", up=False, at=time.time() + 3600)  # an hour ahead
    from controlplane.consensus.raft_machine import observations_command

    machine.apply(1, 1, 500.0, observations_command("m1", [skewed]))
    assert machine.state.observations[("m1", "cn-east", "order")].at == 500.0


def test_the_machine_records_a_drill_once_at_the_entrys_cluster_time() -> None:
    machine = ControlMachine(lambda state: None)

    stored = machine.apply(1, 1, 500.0, drill_command(drill_result("drill-1")))
    before = machine.state
    again = machine.apply(2, 1, 501.0, drill_command(drill_result("drill-1", rto_s=None)))
    refused = machine.apply(3, 1, 502.0, drill_command(dataclasses.replace(drill_result("x"), who="")))

    assert stored == dataclasses.replace(drill_result("drill-1"), recorded_at=500.0)
    assert again == stored
    assert isinstance(refused, Rejected)
    assert machine.state is before
    assert (before.version, before.drills, before.history[-1].kind) == (1, (stored,), "drill")


def test_snapshots_round_trip_the_whole_state() -> None:
    machine = ControlMachine(lambda state: None)
    machine.apply(1, 1, 10.0, intent_command(drain("d1")))
    machine.apply(2, 1, 11.0, decision_command(stamped(1, term=1)))
    machine.apply(3, 1, 12.0, drill_command(drill_result("drill-1")))
    copy = ControlMachine(lambda state: None)
    copy.restore(machine.snapshot())
    assert copy.state == machine.state
    with pytest.raises(StoreError):
        copy.restore(orjson.dumps({"format": 99}))


def test_an_unexpected_or_unknown_command_is_returned_not_raised() -> None:
    machine = ControlMachine(lambda state: None)
    before = machine.state

    broken = machine.apply(1, 1, 1.0, orjson.dumps({"op": "observations", "observer": "m0", "items": [None]}))
    unknown = machine.apply(2, 1, 1.0, orjson.dumps({"op": "from-the-future"}))
    garbage = machine.apply(3, 1, 1.0, b"\x00not json")

    assert all(isinstance(r, StoreError) for r in (broken, unknown, garbage))
    assert machine.state is before


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (NotLeaderError("x"), NoQuorum),
        (NoLeaderError("x"), NoQuorum),
        (ProposalDroppedError("x"), NoQuorum),
        (CommitTimeoutError("x"), NoQuorum),
        (DiskFailedError("x"), StoreError),
        (QueueFullError("x"), StoreError),
        (RaftError("x"), StoreError),
    ],
)
def test_engine_failures_map_to_store_errors(exc: RaftError, error: type[StoreError]) -> None:
    assert type(write_failed(exc, leader="m1")) is error


async def test_writes_fail_fast_without_a_leader(tmp_path: pathlib.Path) -> None:
    members = {"m0": f"127.0.0.1:{free_port()}", "m1": f"127.0.0.1:{free_port()}"}
    alone = RaftStore(member_id="m0", members=members, secret=SECRET, data_dir=tmp_path)
    await alone.start()
    try:
        started = time.monotonic()
        with pytest.raises(NoQuorum):
            await alone.submit_intent(drain("d1"))
        assert time.monotonic() - started < 0.5
        assert alone.status().has_quorum is False
        assert alone.status().quorum_lost_at is not None
    finally:
        await alone.close()
