"""What only the etcd backend promises, and how it rides out etcd's own faults.

The faults are real: etcd frozen with SIGSTOP beyond the lease TTL, etcd killed and
started again on the same data, a member that stops refreshing its lease (what a crashed
or frozen agent looks like to etcd). Tests that hurt etcd get an etcd of their own
(`backend` parametrised with "own"); the others share the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aetcd import rpc

from controlplane.config import parse_settings
from controlplane.consensus import EtcdStore
from controlplane.consensus.etcd_client import EtcdClient, EtcdTls, Event, KeyValue, WatchBatch, put
from controlplane.consensus.etcd_view import (
    EtcdView,
    Layout,
    encode_decision,
    encode_drill,
    encode_history,
    encode_intent,
)
from controlplane.consensus.factory import make_store
from controlplane.errors import ConfigError, Conflict, NoQuorum, NotLeader, StoreError
from controlplane.model import Decision, Observation
from controlplane.state import HISTORY_LIMIT, ControlState, HistoryEntry, StoreStatus
from controlplane.testing.etcdlocal import DEBIAN_PACKAGE, EtcdUnavailable, LocalEtcd, LocalEtcdTls

from .conftest import Cluster, ClusterFactory, EtcdBackend, eventually, free_port
from .test_behaviour import drain, drill_result, make_decision, seen

# etcd's minimum lease TTL: faults that wait for a lease to run out stay short.
FAULT_LEASE_TTL_S = 2
# Generous bounds for things that take about one lease TTL on an idle machine.
FAILOVER_WAIT_S = 20.0

T = TypeVar("T")


@pytest.fixture
async def own_etcd(tmp_path: pathlib.Path) -> AsyncIterator[LocalEtcd]:
    async with LocalEtcd(tmp_path / "etcd", name="faults") as etcd:
        yield etcd


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> EtcdBackend:
    """The session's etcd, or with `indirect` param "own" an etcd this test may hurt."""
    own = getattr(request, "param", None) == "own"
    etcd = request.getfixturevalue("own_etcd" if own else "etcd_server")
    return EtcdBackend(etcd=etcd, lease_ttl_s=FAULT_LEASE_TTL_S)


OWN_ETCD = pytest.mark.parametrize("backend", ["own"], indirect=True)


def etcd_store(cluster: Cluster, member_id: str) -> EtcdStore:
    store = cluster.store(member_id)
    assert isinstance(store, EtcdStore)
    return store


async def freeze(cluster: Cluster, member_id: str) -> EtcdStore:
    """Stop a member's background work: what etcd sees of a crashed or frozen agent.

    Its lease is no longer refreshed and its view no longer moves, but it still holds
    what it believed (that it leads, in its term). It stays in `every_store`, so the
    cluster closes it at the end.
    """
    store = etcd_store(cluster, member_id)
    tasks = list(store._tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    del cluster.stores[member_id]
    return store


async def retrying(write: Callable[[], Awaitable[T]], timeout_s: float = FAILOVER_WAIT_S) -> T:
    """Retry a write that fails with `NoQuorum` while etcd comes back."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await write()
        except NoQuorum:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def decisions_seen(cluster: Cluster) -> AsyncIterator[dict[int, list[Decision]]]:
    """Every distinct decision any member serves while the block runs, by revision."""
    by_revision: dict[int, list[Decision]] = {}

    def sample() -> None:
        for store in cluster.every_store:
            decision = store.state().decision
            if decision is not None:
                seen_here = by_revision.setdefault(decision.revision, [])
                if decision not in seen_here:
                    seen_here.append(decision)

    async def keep_sampling() -> None:
        while True:
            sample()
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(keep_sampling())
    try:
        yield by_revision
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        sample()


def obs(observer: str, region: str = "cn-east", up: bool = True, at: float = 1.0) -> Observation:
    return Observation(observer=observer, region=region, service="order", up=up, at=at)


async def read_prefix(etcd: LocalEtcd, prefix: str) -> dict[bytes, KeyValue]:
    client = EtcdClient([etcd.endpoint], timeout_s=5.0)
    try:
        _, kvs = await client.range_prefix(prefix.encode() + b"/")
        return {kv.key: kv for kv in kvs}
    finally:
        await client.close()


# -- the layout and the fence, against the shared etcd ---------------------------------


async def test_keys_live_where_the_layout_says_with_leases_where_they_expire(
    cluster_factory: ClusterFactory, backend: EtcdBackend
) -> None:
    cluster = await cluster_factory(3)
    leader_id, leader = cluster.leader()
    follower = cluster.followers()[0]
    await leader.commit_decision(make_decision(1, leader))
    await follower.submit_intent(drain("maint/1"))
    await leader.publish_observations(leader_id, [obs(leader_id)])
    await follower.record_drill(drill_result("drill-1"))

    prefix = backend.prefix(cluster)
    keys = await read_prefix(backend.etcd, prefix)
    p = prefix.encode()
    expected = {
        p + b"/leader",
        *(p + b"/members/" + m.encode() for m in cluster.member_ids),
        p + b"/decision/value",
        p + b"/decision/revision",
        p + b"/intents/maint%2F1",  # ids are quoted: a / cannot escape its directory
        p + b"/intent-seq",
        p + b"/history/d/%020d" % 1,
        p + b"/history/i/%020d" % 1,
        p + b"/observations/" + leader_id.encode(),
        p + b"/epoch",
        p + b"/history/e/epoch",
        p + b"/clock",
        p + b"/drills/%020d" % 1,
        p + b"/drill-seq",
        p + b"/history/r/%020d" % 1,
    }
    assert set(keys) == expected
    assert keys[p + b"/epoch"].value == leader.state().epoch.encode()
    assert keys[p + b"/clock"].lease == 0  # the cluster's clock outlives every member
    member_lease = keys[p + b"/members/" + leader_id.encode()].lease
    assert member_lease != 0
    assert keys[p + b"/leader"].lease == member_lease
    assert keys[p + b"/observations/" + leader_id.encode()].lease == member_lease
    assert keys[p + b"/leader"].value == leader_id.encode()
    assert keys[p + b"/leader"].create_revision == leader.status().term
    assert keys[p + b"/decision/value"].lease == 0  # committed state outlives every member
    assert keys[p + b"/drills/%020d" % 1].lease == 0  # so do drill results


async def test_a_deposed_leaders_late_commit_is_refused_by_etcd(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    old_id, old = cluster.leader()
    old_status = old.status()
    first = make_decision(1, old)
    await old.commit_decision(first)
    await cluster.converged(lambda s: s.decision == first)

    # The leader freezes: its lease runs out and another member takes over, while it
    # still believes it leads in its term.
    frozen = await freeze(cluster, old_id)
    new_id = await cluster.wait_for_leader(timeout_s=FAILOVER_WAIT_S)
    assert new_id != old_id
    new = cluster.store(new_id)
    assert new.status().term > old_status.term
    before = {m: seen(s) for m, s in cluster.stores.items()}

    late = make_decision(2, old_status, east_weight=0)
    with pytest.raises(NotLeader) as refused:
        await frozen.commit_decision(late)

    # Refused by the transaction's guard in etcd, not by the member's own belief.
    assert "etcd refused" in refused.value.message
    assert refused.value.leader == new_id
    await asyncio.sleep(0.2)
    assert {m: seen(s) for m, s in cluster.stores.items()} == before
    assert frozen.state().decision == first  # it keeps serving what was committed
    second = make_decision(2, new, east_weight=30)
    assert await new.commit_decision(second) == second
    await cluster.converged(lambda s: s.decision == second)


async def test_a_dead_members_observations_expire_with_its_lease(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(3)
    dead_id, dead = cluster.leader()  # the leader, so that leadership must move too
    alive_id = next(m for m in cluster.member_ids if m != dead_id)
    await dead.publish_observations(dead_id, [obs(dead_id, up=False)])
    await cluster.store(alive_id).publish_observations(alive_id, [obs(alive_id)])
    await cluster.converged(lambda s: len(s.observations) == 2, what="both observations")

    await freeze(cluster, dead_id)

    new_id = await cluster.wait_for_leader(timeout_s=FAILOVER_WAIT_S)
    assert new_id != dead_id
    await cluster.converged(
        lambda s: set(s.observations) == {(alive_id, "cn-east", "order")},
        timeout_s=FAILOVER_WAIT_S,
        what="the dead member's observations to expire",
    )
    for store in cluster.stores.values():
        connected = {m.id: m.connected for m in store.status().members}
        assert connected[dead_id] is False
        assert connected[alive_id] is True


async def test_a_leader_restarted_after_a_crash_releases_its_old_term_at_once(
    cluster_factory: ClusterFactory,
) -> None:
    long_ttl_s = 60  # far longer than the test waits: only a release can end the old term
    cluster = await cluster_factory(3, start=False)
    await cluster.start_all(lease_ttl_s=long_ttl_s)
    old_id = await cluster.wait_for_leader()
    old_term = cluster.store(old_id).status().term

    await freeze(cluster, old_id)  # crashed: its lease and its leader key stay for a minute
    await cluster.start(old_id, lease_ttl_s=long_ttl_s)

    await cluster.wait_for_leader(timeout_s=FAILOVER_WAIT_S)
    assert cluster.store(old_id).status().term > old_term


async def test_a_resubmitted_intent_is_recognised_after_it_stopped_standing(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(2)
    a, b = cluster.store("m0"), cluster.store("m1")
    drained = await a.submit_intent(drain("d1"))
    removed = await a.delete_intent("d1", who="bob", reason="done")
    assert removed == drained

    # Not standing any more, and m1 may not even have seen it: still applied only once.
    again = await b.submit_intent(drain("d1"))

    assert again == drained
    await cluster.converged(lambda s: not s.intents and s.intent_seq == 2)


async def test_concurrent_intents_from_every_member_each_get_one_sequence_number(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    stores = list(cluster.stores.values())
    writes = [
        stores[i % 3].submit_intent(drain(f"d{i}", region=f"region-{i}", service="order")) for i in range(12)
    ]

    committed = await asyncio.gather(*writes)

    assert sorted(i.seq for i in committed) == list(range(1, 13))
    await cluster.converged(lambda s: len(s.intents) == 12 and s.intent_seq == 12)
    history = [h for h in stores[0].state().history if h.kind == "intent"]
    assert [h.intent_id for h in history] == [i.id for i in sorted(committed, key=lambda i: i.seq)]


async def test_concurrent_drills_from_every_member_are_each_recorded_once(
    cluster_factory: ClusterFactory, backend: EtcdBackend
) -> None:
    cluster = await cluster_factory(3)
    stores = list(cluster.stores.values())
    # Six drills, each sent twice at once through two different members.
    writes = [stores[(i + k) % 3].record_drill(drill_result(f"drill-{i}")) for i in range(6) for k in (0, 1)]

    recorded = await asyncio.gather(*writes)

    for i in range(6):
        assert recorded[2 * i] == recorded[2 * i + 1]  # the retry got the first one back
    await cluster.converged(lambda s: len(s.drills) == 6, what="six drills")
    assert sorted(d.id for d in stores[0].state().drills) == [f"drill-{i}" for i in range(6)]
    keys = await read_prefix(backend.etcd, backend.prefix(cluster))
    p = backend.prefix(cluster).encode()
    assert keys[p + b"/drill-seq"].value == b"6"
    assert sum(1 for k in keys if k.startswith(p + b"/history/r/")) == 6


async def test_two_commits_of_one_revision_at_once_one_wins_one_conflicts(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    one = make_decision(1, leader, east_weight=10)
    other = make_decision(1, leader, east_weight=90)

    results = await asyncio.gather(
        leader.commit_decision(one), leader.commit_decision(other), return_exceptions=True
    )

    won = [r for r in results if isinstance(r, Decision)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], Conflict)
    await cluster.converged(lambda s: s.decision == won[0])


async def test_a_store_that_cannot_reach_etcd_fails_to_start() -> None:
    store = EtcdStore(member_id="m0", endpoints=[f"127.0.0.1:{free_port()}"], timeout_s=0.5)
    with pytest.raises(StoreError):
        await store.start()
    await store.close()
    assert store.status().has_quorum is False
    assert store.state() == ControlState()


# -- etcd's own faults -----------------------------------------------------------------


@OWN_ETCD
async def test_etcd_paused_beyond_the_lease_ttl_then_resumed(
    cluster_factory: ClusterFactory, backend: EtcdBackend
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    first = make_decision(1, leader)
    await leader.commit_decision(first)
    await cluster.store("m1").submit_intent(drain("d1"))
    await cluster.converged(lambda s: s.decision == first and "d1" in s.intents)
    before = {m: seen(s) for m, s in cluster.stores.items()}

    async with decisions_seen(cluster) as decisions:
        backend.etcd.pause()
        try:
            await eventually(
                lambda: not any(s.status().has_quorum for s in cluster.stores.values()),
                timeout_s=FAILOVER_WAIT_S,
                what="every member to notice that etcd is gone",
            )
            for store in cluster.stores.values():
                assert store.status().quorum_lost_at is not None
                assert not store.status().is_leader
            # Writes fail within their timeout (they may still apply when etcd wakes up).
            with pytest.raises(NoQuorum):
                await leader.commit_decision(make_decision(2, leader, east_weight=10))
            with pytest.raises(NoQuorum):
                await cluster.store("m2").submit_intent(drain("d2", region="cn-south"))
            await asyncio.sleep(FAULT_LEASE_TTL_S + 1.0)
            # Static stability: every member still serves the last state it synchronised.
            assert {m: seen(s) for m, s in cluster.stores.items()} == before
        finally:
            backend.etcd.resume()

        new_id = await cluster.wait_for_leader(timeout_s=FAILOVER_WAIT_S)
        new = cluster.store(new_id)

        async def commit_next() -> Decision:
            while True:
                current = new.state().decision
                assert current is not None
                decision = make_decision(current.revision + 1, new, east_weight=30)
                try:
                    return await new.commit_decision(decision)
                except Conflict:  # the write made during the pause landed after all
                    await asyncio.sleep(0.1)

        committed = await retrying(commit_next)
        await cluster.converged(lambda s: s.decision == committed, timeout_s=FAILOVER_WAIT_S)

    assert {r: len(ds) for r, ds in decisions.items() if len(ds) > 1} == {}
    assert set(decisions) <= {1, 2, 3}


@OWN_ETCD
async def test_etcd_restarted_watches_resume_and_state_converges(
    cluster_factory: ClusterFactory, backend: EtcdBackend
) -> None:
    cluster = await cluster_factory(3)
    _, leader = cluster.leader()
    first = make_decision(1, leader)
    await leader.commit_decision(first)
    await cluster.converged(lambda s: s.decision == first)

    await backend.etcd.kill()
    await eventually(
        lambda: not any(s.status().has_quorum for s in cluster.stores.values()),
        timeout_s=FAILOVER_WAIT_S,
        what="every member to notice that etcd is gone",
    )
    assert all(s.state().decision == first for s in cluster.stores.values())
    await backend.etcd.start()

    new_id = await cluster.wait_for_leader(timeout_s=FAILOVER_WAIT_S)
    new = cluster.store(new_id)
    second = make_decision(2, new, east_weight=20)
    assert await retrying(lambda: new.commit_decision(second)) == second
    # Written by a follower after the restart: every member must see it through its watch.
    writer = next(s for m, s in cluster.stores.items() if m != new_id)
    drained = await retrying(lambda: writer.submit_intent(drain("after-restart")))
    await cluster.converged(
        lambda s: s.decision == second and s.intents.get("after-restart") == drained,
        timeout_s=FAILOVER_WAIT_S,
        what="the writes made after the restart",
    )


async def enable_auth(etcd: LocalEtcd, password: str) -> None:
    channel = rpc.insecure_channel(f"127.0.0.1:{etcd.client_port}")
    try:
        auth = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
    finally:
        await channel.close()


async def test_username_and_password_are_required_and_survive_an_etcd_restart(own_etcd: LocalEtcd) -> None:
    await enable_auth(own_etcd, "s3cret")

    def store(member_id: str, **credentials: Any) -> EtcdStore:
        return EtcdStore(member_id=member_id, endpoints=[own_etcd.endpoint], timeout_s=1.0, **credentials)

    for refused in (store("m9"), store("m9", username="root", password="wrong")):
        with pytest.raises(StoreError):
            await refused.start()
        await refused.close()

    good = store("m0", username="root", password="s3cret")
    await good.start()
    try:
        await eventually(lambda: good.status().is_leader, timeout_s=FAILOVER_WAIT_S, what="m0 to lead")
        await good.submit_intent(drain("d1"))
        # etcd forgets its tokens when it restarts: the client must authenticate again.
        await own_etcd.restart()
        drained = await retrying(lambda: good.submit_intent(drain("d2", region="cn-south")))
        await eventually(lambda: good.state().intents.get("d2") == drained, what="d2 through the watch")
    finally:
        await good.close()


def make_certificates(directory: pathlib.Path) -> LocalEtcdTls:
    """A throwaway CA, a server pair for 127.0.0.1 and a client pair (the harness's own)."""
    from controlplane.testing.tls import make_certificates as make

    certs = make(directory)
    return LocalEtcdTls(
        certs.ca_file,
        certs.server.cert_file,
        certs.server.key_file,
        certs.client.cert_file,
        certs.client.key_file,
    )


async def test_tls_with_a_client_certificate(tmp_path: pathlib.Path) -> None:
    certs = make_certificates(tmp_path / "pki")
    async with LocalEtcd(tmp_path / "etcd", tls=certs) as etcd:
        assert etcd.endpoint.startswith("https://")
        with_client_cert = EtcdTls(certs.ca_file, certs.client_cert_file, certs.client_key_file)
        store = EtcdStore(member_id="m0", endpoints=[etcd.endpoint], tls=with_client_cert, timeout_s=2.0)
        await store.start()
        try:
            await eventually(lambda: store.status().is_leader, timeout_s=FAILOVER_WAIT_S, what="m0 to lead")
            decision = make_decision(1, store)
            assert await store.commit_decision(decision) == decision
            assert store.state().decision == decision
        finally:
            await store.close()

        without = EtcdStore(
            member_id="m1", endpoints=[etcd.endpoint], tls=EtcdTls(ca_file=certs.ca_file), timeout_s=1.0
        )
        with pytest.raises(StoreError):
            await without.start()
        await without.close()


async def test_an_endpoint_that_refuses_connections_is_passed_over(etcd_server: LocalEtcd) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore(
        member_id="m0",
        endpoints=[dead, etcd_server.endpoint],
        prefix=f"/endpoints-{time.time_ns()}",
        timeout_s=1.0,
    )
    await store.start()
    try:
        await eventually(lambda: store.status().is_leader, timeout_s=FAILOVER_WAIT_S, what="m0 to lead")
        decision = make_decision(1, store)
        assert await store.commit_decision(decision) == decision
    finally:
        await store.close()


# -- LocalEtcd ---------------------------------------------------------------------------


async def test_a_missing_etcd_binary_names_the_debian_package(tmp_path: pathlib.Path) -> None:
    etcd = LocalEtcd(tmp_path, binary="etcd-binary-that-does-not-exist")
    with pytest.raises(EtcdUnavailable) as missing:
        await etcd.start()
    assert DEBIAN_PACKAGE == "etcd-server"
    assert "etcd-server" in f"{missing.value.message} {missing.value.detail}"
    await etcd.close()


async def test_local_etcd_restarts_on_the_same_data_and_ports_and_cleans_up() -> None:
    async with LocalEtcd() as etcd:
        endpoint, first_pid = etcd.endpoint, etcd.pid
        client = EtcdClient([endpoint], timeout_s=2.0)
        try:
            result = await client.txn([], [put(b"/k", b"v")])
            await etcd.restart()
            assert (etcd.endpoint, etcd.running) == (endpoint, True)
            assert etcd.pid != first_pid
            revision, kvs = await retrying(lambda: client.range_prefix(b"/k"))
            assert revision >= result.revision
            assert [kv.value for kv in kvs] == [b"v"]
        finally:
            await client.close()
    assert not etcd.running
    assert not etcd.root.exists()  # a temporary directory it made itself


# -- configuration -----------------------------------------------------------------------


SETTINGS: dict[str, Any] = {
    "cluster": {
        "agents": [
            {"id": "a1", "region": "cn-east", "raft": "127.0.0.1:7701", "http": "127.0.0.1:8701"},
            {"id": "a2", "region": "cn-east", "raft": "127.0.0.1:7702", "http": "127.0.0.1:8702"},
        ]
    },
    "regions": {
        "cn-east": {"capacity_rps": 100, "services": {"order": {"targets": ["http://127.0.0.1:9/"]}}}
    },
}


def settings_with(etcd: dict[str, Any]) -> Any:
    raw = dict(SETTINGS, backend={"kind": "etcd", "etcd": etcd})
    return parse_settings(raw)


def test_make_store_builds_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_PASSWORD", "pw")
    settings = settings_with(
        {
            "endpoints": ["http://10.0.0.1:2379", "10.0.0.2:2379"],
            "prefix": "/cp/prod",
            "lease_ttl_s": 7,
            "username": "agent",
            "password": {"env": "ETCD_PASSWORD"},
        }
    )

    store = make_store(settings, "a2", pathlib.Path("/nonexistent"))

    assert (store.member_id, store.endpoints, store.lease_ttl_s) == (
        "a2",
        ("http://10.0.0.1:2379", "10.0.0.2:2379"),
        7,
    )
    assert store.layout.root == b"/cp/prod/"
    assert store.address == "127.0.0.1:8702"
    assert {m.id: m.address for m in store.status().members} == {
        "a1": "127.0.0.1:8701",
        "a2": "127.0.0.1:8702",
    }


def test_make_store_lists_every_problem_with_its_field(tmp_path: pathlib.Path) -> None:
    settings = settings_with(
        {
            "endpoints": ["127.0.0.1:2379"],
            "password": {"env": "CONTROLPLANE_TEST_UNSET_PASSWORD"},
            "tls": {"ca_file": str(tmp_path / "missing-ca.pem"), "cert_file": str(tmp_path / "c.pem")},
        }
    )

    with pytest.raises(ConfigError) as refused:
        make_store(settings, "a1", pathlib.Path("/nonexistent"))

    fields = sorted(p.split(":")[0] for p in refused.value.problems)
    assert fields == [
        "backend.etcd.password.env",
        "backend.etcd.tls.ca_file",
        "backend.etcd.tls.cert_file",
        "backend.etcd.tls.key_file",
        "backend.etcd.username",
    ]


def test_the_etcd_backend_needs_the_etcd_section() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings({**SETTINGS, "backend": {"kind": "etcd"}})
    assert refused.value.problems[0].startswith("backend.etcd:")


def test_unusable_arguments_are_all_listed() -> None:
    with pytest.raises(ConfigError) as refused:
        EtcdStore(member_id="m0", endpoints=["nowhere"], prefix="relative", lease_ttl_s=1, timeout_s=0)
    fields = sorted(p.split(":")[0] for p in refused.value.problems)
    assert fields == [
        "backend.etcd.endpoints[0]",
        "backend.etcd.lease_ttl_s",
        "backend.etcd.prefix",
        "backend.etcd.timeout_s",
    ]


# -- the local view, without etcd --------------------------------------------------------

LAYOUT = Layout("/cp")


def put_event(key: bytes, value: bytes, revision: int, created: int | None = None, lease: int = 0) -> Event:
    return Event(KeyValue(key, value, created or revision, revision, lease), deleted=False)


def delete_event(key: bytes, revision: int) -> Event:
    return Event(KeyValue(key, b"", 0, revision), deleted=True)


def history_event(key: bytes, kind: str, revision: int, decision_revision: int) -> Event:
    entry = HistoryEntry(
        kind=kind, at=float(revision), revision=decision_revision, summary=f"{kind} {revision}"
    )
    return put_event(key, encode_history(entry), revision)


def test_the_view_versions_state_changes_only_and_applies_whole_responses() -> None:
    view = EtcdView(LAYOUT)
    decision = make_decision(1, STATUS)
    drained = dataclasses.replace(drain("d1"), seq=1)
    kvs = [
        KeyValue(LAYOUT.decision, encode_decision(decision), 5, 5),
        KeyValue(LAYOUT.leader, b"m0", 9, 9, lease=7),  # leadership is not state: not the version
    ]
    assert view.reset(kvs, revision=9) is True
    assert (view.state.version, view.state.decision, view.leader and view.leader.value) == (
        5,
        decision,
        b"m0",
    )

    # One response holding a whole intent transaction: seen all at once, at its revision.
    batch = WatchBatch(
        12,
        (
            put_event(LAYOUT.intent("d1"), encode_intent(drained), 12),
            put_event(LAYOUT.intent_seq, b"1", 12),
            history_event(LAYOUT.intent_entry(1), "intent", 12, 1),
        ),
    )
    assert view.apply(batch) is True
    assert (view.state.version, dict(view.state.intents), view.state.intent_seq) == (12, {"d1": drained}, 1)
    assert view.intents_read().seq_mod_revision == 12

    assert view.apply(WatchBatch(13, (delete_event(LAYOUT.leader, 13),))) is False
    assert (view.state.version, view.leader) == (12, None)
    assert view.apply(WatchBatch(20, ())) is False  # progress: revision only
    assert (view.revision, view.applied_revision, view.state.version) == (20, 13, 12)
    # A replayed event (older than what is applied) changes nothing.
    assert view.apply(WatchBatch(12, (put_event(LAYOUT.intent_seq, b"7", 12),))) is False
    assert view.state.intent_seq == 1

    # Resynchronising to the same content keeps the version; other content moves it on.
    same = [*kvs[:1], KeyValue(LAYOUT.intent("d1"), encode_intent(drained), 12, 12)]
    same += [KeyValue(LAYOUT.intent_seq, b"1", 12, 12)]
    same += [KeyValue(LAYOUT.intent_entry(1), batch.events[2].kv.value, 12, 12)]
    assert view.reset(same, revision=30) is False
    assert view.state.version == 12
    assert view.reset(same[:1], revision=31) is True
    assert (view.state.version, dict(view.state.intents)) == (31, {})


def test_the_view_ignores_what_it_cannot_decode() -> None:
    view = EtcdView(LAYOUT)
    view.reset([], revision=1)
    batch = WatchBatch(
        2,
        (
            put_event(LAYOUT.decision, b"not json", 2),
            put_event(LAYOUT.observer("m0"), b'{"observations": [{"observer": "m0"}]}', 2),
            put_event(LAYOUT.observer("m1"), b'{"observations": [' + _obs_json("m9") + b"]}", 2),
            put_event(LAYOUT.root + b"something-else", b"x", 2),
        ),
    )
    view.apply(batch)
    assert view.state.decision is None
    assert dict(view.state.observations) == {}  # m1's key cannot speak for m9


def test_the_view_shows_drills_in_sequence_order_and_skips_undecodable_ones() -> None:
    view = EtcdView(LAYOUT)
    first, second = drill_result("drill-a"), drill_result("drill-b", rto_s=None)
    view.reset(
        [
            KeyValue(LAYOUT.drill(2), encode_drill(second), 3, 3),
            KeyValue(LAYOUT.drill(1), encode_drill(first), 4, 4),  # created later, but seq 1
            KeyValue(LAYOUT.drill_seq, b"2", 4, 4),
        ],
        revision=4,
    )
    assert view.state.drills == (first, second)
    assert (view.drills_read().seq, view.drills_read().seq_mod_revision) == (2, 4)

    third = drill_result("drill-c")
    batch = WatchBatch(
        5,
        (
            put_event(LAYOUT.drill(3), encode_drill(third), 5),
            put_event(LAYOUT.drill_seq, b"3", 5),
            delete_event(LAYOUT.drill(1), 5),
            put_event(LAYOUT.drill(4), b"not json", 5),
        ),
    )
    assert view.apply(batch) is True
    assert view.state.drills == (second, third)
    assert view.state.version == 5


def test_history_shows_the_newest_entries_of_decisions_and_intents_together() -> None:
    view = EtcdView(LAYOUT)
    view.reset([], revision=1)
    revision = 1
    decisions = intents = 0
    for step in range(HISTORY_LIMIT + 300):
        revision += 1
        events: list[Event] = []
        if step % 3 == 0:
            intents += 1
            events.append(history_event(LAYOUT.intent_entry(intents), "intent", revision, decisions))
            events.append(delete_event(LAYOUT.intent_entry(intents - HISTORY_LIMIT), revision))
        else:
            decisions += 1
            events.append(history_event(LAYOUT.decision_entry(decisions), "decision", revision, decisions))
            events.append(delete_event(LAYOUT.decision_entry(decisions - HISTORY_LIMIT), revision))
        view.apply(WatchBatch(revision, tuple(events)))

    history = view.state.history
    assert len(history) == HISTORY_LIMIT
    assert [h.at for h in history] == [float(r) for r in range(revision - HISTORY_LIMIT + 1, revision + 1)]


def _obs_json(observer: str) -> bytes:
    return (
        b'{"observer": "%s", "region": "cn-east", "service": "order", "up": true, "at": 1.0}'
        % observer.encode()
    )


STATUS = StoreStatus(
    member_id="m0", leader="m0", is_leader=True, term=3, commit_index=0, members=(), has_quorum=True
)
