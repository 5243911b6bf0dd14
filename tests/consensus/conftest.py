"""Real consensus clusters on loopback for the behaviour suite.

`cluster_factory(n)` starts `n` members of the backend under test (random free loopback
ports, one temporary data dir per member), waits until they agree on a leader, and hands
back a `Cluster` that can stop, start and restart members on the same addresses and data.
Every member the factory started is closed at the end of the test, pass or fail, and a
test that leaves a Raft engine thread behind fails.

A backend is a `Backend`: something that turns (cluster, member id) into an unstarted
`ControlStore`. The `backend` fixture is parametrised by name (`BACKENDS`). The etcd
backend runs its members against one real etcd for the whole session (`LocalEtcd` on
loopback, non-default ports, a temporary data dir), each cluster under its own key
prefix. Without the `etcd` binary the etcd tests fail, naming the Debian package; they
are never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pytest

from controlplane.consensus import ControlStore, EtcdStore, MemoryGroup, MemoryStore, RaftStore, RaftTimings
from controlplane.state import ControlState, StoreStatus
from controlplane.testing.etcdlocal import LocalEtcd
from controlplane.testing.ports import free_port

SECRET = "test-cluster-secret-of-16-bytes-at-least"
LEADER_TIMEOUT_S = 10.0

T = TypeVar("T")


async def eventually(probe: Callable[[], T | None], timeout_s: float = 5.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail the test at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class Backend(Protocol):
    name: str

    def make_store(self, cluster: Cluster, member_id: str, **options: Any) -> ControlStore:
        """An unstarted store for `member_id`; `options` override backend settings."""


@dataclass
class RaftBackend:
    name: str = "raft"
    timings: RaftTimings = field(default_factory=RaftTimings)

    def make_store(self, cluster: Cluster, member_id: str, **options: Any) -> ControlStore:
        settings: dict[str, Any] = {
            "member_id": member_id,
            "members": cluster.addresses,
            "secret": SECRET,
            "data_dir": cluster.data_dir(member_id),
            "timings": self.timings,
        }
        settings.update(options)
        return RaftStore(**settings)


# etcd's minimum lease TTL is 2 s; 3 s leaves a restart of every member (which does not
# revoke leases) well inside it. Short timeouts so fault tests notice outages quickly.
ETCD_LEASE_TTL_S = 3
ETCD_TIMEOUT_S = 1.0

_prefixes = itertools.count()


@dataclass
class EtcdBackend:
    """Members of one cluster share an etcd; each cluster gets a fresh key prefix."""

    etcd: LocalEtcd
    name: str = "etcd"
    lease_ttl_s: int = ETCD_LEASE_TTL_S
    timeout_s: float = ETCD_TIMEOUT_S
    prefixes: dict[int, str] = field(default_factory=dict)

    def prefix(self, cluster: Cluster) -> str:
        return self.prefixes.setdefault(id(cluster), f"/test-{time.time_ns()}-{next(_prefixes)}")

    def make_store(self, cluster: Cluster, member_id: str, **options: Any) -> ControlStore:
        settings: dict[str, Any] = {
            "member_id": member_id,
            "endpoints": [self.etcd.endpoint],
            "prefix": self.prefix(cluster),
            "lease_ttl_s": self.lease_ttl_s,
            "timeout_s": self.timeout_s,
            "members": {m: cluster.addresses[m] for m in cluster.member_ids},
            "address": cluster.addresses[member_id],
        }
        settings.update(options)
        return EtcdStore(**settings)


@dataclass
class MemoryBackend:
    """Members of one cluster are handles on one `MemoryGroup` (in this process)."""

    name: str = "memory"
    groups: dict[int, MemoryGroup] = field(default_factory=dict)

    def make_store(self, cluster: Cluster, member_id: str, **options: Any) -> ControlStore:
        group = self.groups.setdefault(id(cluster), MemoryGroup(cluster.member_ids))
        return MemoryStore(member_id, group, **options)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "memory": lambda request: MemoryBackend(),
    "raft": lambda request: RaftBackend(),
    "etcd": lambda request: EtcdBackend(etcd=request.getfixturevalue("etcd_server")),
}


@dataclass
class Cluster:
    """Members of one group; `stores` holds the running ones."""

    backend: Backend
    root: pathlib.Path
    member_ids: tuple[str, ...]
    addresses: dict[str, str] = field(default_factory=dict)
    stores: dict[str, ControlStore] = field(default_factory=dict)
    every_store: list[ControlStore] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.addresses:
            self.addresses = {m: f"127.0.0.1:{free_port()}" for m in self.member_ids}

    def data_dir(self, member_id: str) -> pathlib.Path:
        return self.root / member_id

    async def start(self, member_id: str, **options: Any) -> ControlStore:
        if member_id in self.stores:
            raise RuntimeError(f"{member_id} is already running")
        store = self.backend.make_store(self, member_id, **options)
        self.every_store.append(store)  # closed at teardown even if start fails
        await store.start()
        self.stores[member_id] = store
        return store

    async def start_all(self, **options: Any) -> None:
        await asyncio.gather(*(self.start(m, **options) for m in self.member_ids if m not in self.stores))

    async def stop(self, member_id: str) -> None:
        await self.stores.pop(member_id).close()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in list(self.stores)))

    async def close(self) -> None:
        for store in self.every_store:
            with contextlib.suppress(Exception):
                await store.close()
        self.stores.clear()

    def store(self, member_id: str) -> ControlStore:
        return self.stores[member_id]

    def statuses(self, among: Iterable[str] | None = None) -> dict[str, StoreStatus]:
        ids = list(self.stores) if among is None else list(among)
        return {m: self.stores[m].status() for m in ids}

    async def wait_for_leader(
        self, among: Iterable[str] | None = None, timeout_s: float = LEADER_TIMEOUT_S
    ) -> str:
        """The leader, once every member in `among` agrees on it and has quorum."""
        ids = tuple(self.stores) if among is None else tuple(among)

        def agreed() -> str | None:
            statuses = self.statuses(ids)
            leaders = {s.leader for s in statuses.values()}
            if len(leaders) != 1 or None in leaders:
                return None
            (leader,) = leaders
            if leader not in statuses or not statuses[leader].is_leader:
                return None
            if not all(s.has_quorum for s in statuses.values()):
                return None
            return leader

        return await eventually(agreed, timeout_s, f"a leader agreed by {', '.join(ids)}")

    def leader(self) -> tuple[str, ControlStore]:
        leaders = [m for m, s in self.stores.items() if s.status().is_leader]
        assert len(leaders) == 1, f"expected one leader, got {leaders}"
        return leaders[0], self.stores[leaders[0]]

    def followers(self) -> list[ControlStore]:
        return [s for s in self.stores.values() if not s.status().is_leader]

    async def converged(
        self, check: Callable[[ControlState], bool], timeout_s: float = 5.0, what: str = "state"
    ) -> None:
        """Wait until `check` holds on every running member's state."""
        await eventually(
            lambda: all(check(s.state()) for s in self.stores.values()), timeout_s, f"{what} on every member"
        )


ClusterFactory = Callable[..., Awaitable[Cluster]]


def _raft_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("raft-")]


@pytest.fixture(autouse=True)
def no_leaked_raft_threads() -> Iterator[None]:
    """Fail a test that leaves a Raft engine thread running (set up first, checked last)."""
    before = set(_raft_threads())
    yield
    deadline = time.monotonic() + 2.0
    while (leaked := set(_raft_threads()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not leaked, f"raft threads still running after the test: {leaked}"


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One etcd for the session; fails (never skips) without the `etcd-server` package."""
    etcd = LocalEtcd(tmp_path_factory.mktemp("etcd"), name="behaviour")
    try:
        yield etcd.start_blocking()
    finally:
        etcd.close_blocking()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
async def cluster_factory(backend: Backend, tmp_path: pathlib.Path) -> AsyncIterator[ClusterFactory]:
    clusters: list[Cluster] = []

    async def make(n: int = 3, *, start: bool = True) -> Cluster:
        """`n` members; with `start`, started and agreed on a leader."""
        cluster = Cluster(
            backend=backend,
            root=tmp_path / f"cluster{len(clusters)}",
            member_ids=tuple(f"m{i}" for i in range(n)),
        )
        clusters.append(cluster)
        if start:
            await cluster.start_all()
            await cluster.wait_for_leader()
            # The cluster's state exists once it has its epoch (created by the first leader),
            # and its clock once every member has heard the leader's.
            await cluster.converged(lambda s: bool(s.epoch), what="the cluster state's epoch")
            await eventually(
                lambda: all(s.cluster_time() is not None for s in cluster.stores.values()),
                what="the cluster's clock on every member",
            )
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            await cluster.close()
