"""A scripted network of `RaftCore`s for unit tests: no sockets, no sleeps, no threads.

Each node has the storage it persisted (`MemStorage`) and a list state machine (the
data of the entries it applied, in order). Messages wait in an outbox until the test
delivers them, all at once (`deliver_all`) or one by one (`deliver_one`), so a test can
look at every node between any two steps.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable

from controlplane.raft.core import CoreConfig, RaftCore, Restored
from controlplane.raft.messages import EntryKind, Message, ReadState, Role, Snapshot
from tests.raft.sim import MemStorage

CONFIG = CoreConfig(election_ticks_min=10, election_ticks_max=20, heartbeat_ticks=2, max_inflight=8)


class Net:
    def __init__(
        self,
        ids: Iterable[str] = ("n1", "n2", "n3"),
        config: CoreConfig = CONFIG,
        restored: dict[str, Restored] | None = None,
        seed: int = 7,
    ) -> None:
        self.ids = list(ids)
        self.config = config
        self.cores = {
            i: RaftCore(i, self.ids, config, random.Random(seed + n), (restored or {}).get(i))
            for n, i in enumerate(self.ids)
        }
        self.storage = {i: MemStorage() for i in self.ids}
        self.applied: dict[str, list[bytes]] = {i: [] for i in self.ids}
        self.applied_index = dict.fromkeys(self.ids, 0)
        self.read_states: dict[str, list[ReadState]] = {i: [] for i in self.ids}
        self.outbox: deque[Message] = deque()
        self.blocked: set[tuple[str, str]] = set()
        self.dropped: list[Message] = []
        self.after_step: Callable[[], None] | None = None

    # -- Ready handling, as a shell would -------------------------------------------------------

    def flush(self, node: str) -> None:
        core = self.cores[node]
        while core.has_ready():
            rd = core.ready()
            self.storage[node].persist(rd)
            self.outbox.extend(rd.messages)
            self.read_states[node].extend(rd.read_states)
            if rd.snapshot is not None:
                self.applied[node] = [d for d in rd.snapshot.data.split(b"\n") if d]
                self.applied_index[node] = rd.snapshot.index
            for e in rd.committed:
                assert e.index == self.applied_index[node] + 1, (node, e.index, self.applied_index[node])
                if e.kind is EntryKind.NORMAL:
                    self.applied[node].append(e.data)
                self.applied_index[node] = e.index
            core.advance(rd)

    def flush_all(self) -> None:
        for i in self.ids:
            self.flush(i)

    def compact(self, node: str) -> None:
        core = self.cores[node]
        index = core.applied
        snap = Snapshot(index, core.log.term(index) or 0, 0.0, b"\n".join(self.applied[node]))
        core.compact(index, snap)
        self.storage[node].compact(snap)

    # -- the network -----------------------------------------------------------------------------

    def isolate(self, node: str) -> None:
        for other in self.ids:
            if other != node:
                self.blocked |= {(node, other), (other, node)}

    def heal(self) -> None:
        self.blocked.clear()

    def deliver_one(self) -> Message | None:
        self.flush_all()
        while self.outbox:
            m = self.outbox.popleft()
            if (m.src, m.dst) in self.blocked:
                self.dropped.append(m)
                continue
            self.cores[m.dst].step(m)
            self.flush(m.dst)
            if self.after_step is not None:
                self.after_step()
            return m
        return None

    def deliver_all(self, limit: int = 100_000) -> int:
        n = 0
        while self.deliver_one() is not None:
            n += 1
            if n >= limit:
                raise AssertionError("messages never stopped flowing")
        return n

    def tick(self, node: str, n: int = 1) -> None:
        for _ in range(n):
            self.cores[node].tick()
            self.flush(node)
            if self.after_step is not None:
                self.after_step()

    def tick_all(self, n: int = 1, deliver: bool = True) -> None:
        for _ in range(n):
            for i in self.ids:
                self.tick(i)
            if deliver:
                self.deliver_all()

    def elect(self, node: str) -> None:
        self.cores[node].campaign()
        self.flush(node)
        self.deliver_all()
        assert self.cores[node].role is Role.LEADER, self.cores[node].role

    def propose(self, node: str, *data: bytes) -> int:
        index, _term = self.cores[node].propose(list(data), 0.0)
        self.flush(node)
        return index

    def leaders(self) -> list[str]:
        return [i for i in self.ids if self.cores[i].role is Role.LEADER]
