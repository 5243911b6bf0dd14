"""A deterministic simulation of a Raft cluster built from `RaftCore`, for safety checks.

Everything comes from one seeded `random.Random`: message delays (hence reordering),
loss, duplication, partitions (symmetric, one-way, bridge), crashes and restarts where
a node comes back with exactly what it had persisted (a crash in the middle of a Ready
may tear it: a prefix of its entries is stored, nothing of it was sent or applied),
proposals, ReadIndex requests, leadership transfers and compaction. There is no real
time: an event queue orders ticks and deliveries.

After every event the checker verifies:

- election safety: at most one leader per term, ever;
- log matching: an (index, term) names one entry (data and the term before it), ever;
- leader completeness: a new leader holds every entry committed anywhere so far;
- state-machine safety: no two nodes apply different entries at one index, and no node
  applies an entry other than the one committed there;
- durability: a restarted node replays at least what it had applied before its crash;
- ReadIndex: an answer is at least the commit index any node had when it was asked.

After the faults stop (everything healed and restarted) it checks liveness: a leader is
elected and a new proposal is applied on every node within a bounded simulated time.

Damaged journals (`damage_one`): a node crashes and restarts having lost everything
from a random record on (committed entries included), in recovering mode; sometimes it
also lost both hard-state slots (vote_unknown). At most one node is damaged at a time:
damaged nodes do not vote until they caught up, so a damaged majority would wedge, by
design.

Replay a failure with `python -m tests.raft.sim SEED [STEPS] [NODES]`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from controlplane.raft.core import CoreConfig, ProposalRefused, RaftCore, Restored
from controlplane.raft.messages import Entry, EntryKind, HardState, Message, Ready, Role, Snapshot


class SimFailure(AssertionError):
    pass


@dataclass
class MemStorage:
    """What a node has fsynced. Survives crashes; the core does not."""

    hard: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    entries: list[Entry] = field(default_factory=list)
    # Set by `damage()`: the next start is in recovering mode, as after a damaged journal.
    damaged: bool = False
    vote_lost: bool = False

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    def persist(self, rd: Ready, rng: random.Random | None = None) -> None:
        """Store a Ready: hard state first, then snapshot, entries and the commit mark
        (the order of controlplane/raft/storage.py). With `rng`, the crash tears it."""
        stage = 4 if rng is None else rng.randrange(4)
        if stage == 0:
            return
        if rd.hard_state is not None:
            self.hard = HardState(rd.hard_state.term, rd.hard_state.vote, self.hard.commit)
        if stage == 1:
            return
        if rd.snapshot is not None:
            snap = rd.snapshot
            keep = [e for e in self.entries if e.index > snap.index]
            matches = any(e.index == snap.index and e.term == snap.term for e in self.entries)
            self.snapshot = snap
            self.entries = keep if matches else []
        entries = list(rd.entries)
        if stage == 2 and entries:
            entries = entries[: rng.randrange(len(entries)) if rng else len(entries)]
        if entries:
            first = entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + entries
        if stage >= 3 and rd.hard_state is not None:
            self.hard = rd.hard_state

    def compact(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > snap.index]

    def damage(self, rng: random.Random, lose_vote: bool) -> None:
        """What storage.py does with a damaged journal: everything from a random record on
        is gone (committed entries included); with `lose_vote`, both hard-state slots too."""
        if self.entries:
            self.entries = self.entries[: rng.randrange(len(self.entries))]
        self.damaged = True
        if lose_vote:
            self.hard = HardState(0, None, self.hard.commit)
            self.vote_lost = True

    def restored(self) -> tuple[Restored, int]:
        entries = [e for e in self.entries if e.index > self.snapshot.index]
        commit = min(max(self.hard.commit, self.snapshot.index), self.snapshot.index + len(entries))
        restored = Restored(
            hard_state=self.hard,
            snapshot=self.snapshot,
            entries=tuple(entries),
            applied=commit,
            recovering=self.damaged,
            vote_unknown=self.vote_lost,
        )
        self.damaged = self.vote_lost = False
        return restored, commit


def _digest(prev: str, index: int, data: bytes) -> str:
    return hashlib.blake2b(f"{prev}|{index}|".encode() + data, digest_size=8).hexdigest()


@dataclass
class SimNode:
    id: str
    storage: MemStorage
    core: RaftCore | None = None
    applied: int = 0
    state: str = ""  # digest chain of applied entries: the state machine
    applied_before_crash: int = 0
    last_role: Role = Role.FOLLOWER
    compact_every: int = 25


@dataclass
class Totals:
    steps: int = 0
    delivered: int = 0
    dropped: int = 0
    elections: int = 0
    crashes: int = 0
    damaged: int = 0
    snapshots_installed: int = 0
    committed: int = 0
    reads_answered: int = 0
    proposals: int = 0


class Simulation:
    def __init__(self, seed: int, n_nodes: int = 3, damage: bool = True, lose_votes: bool = False) -> None:
        self.seed = seed
        self.damage_enabled = damage
        self.lose_votes = lose_votes
        self.rng = random.Random(seed)
        self.ids = [f"n{i}" for i in range(1, n_nodes + 1)]
        self.config = CoreConfig(
            election_ticks_min=10,
            election_ticks_max=20,
            heartbeat_ticks=2,
            max_append_entries=self.rng.choice([1, 4, 64]),
            max_inflight=self.rng.choice([1, 4, 32]),
        )
        self.nodes = {
            i: SimNode(i, MemStorage(), compact_every=self.rng.choice([5, 25, 200])) for i in self.ids
        }
        self.now = 0.0
        self.queue: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.blocked: set[tuple[str, str]] = set()
        self.loss = 0.0
        self.dup = 0.0
        self.leaders: dict[int, str] = {}
        self.entry_ids: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.max_committed_index = 0
        self.digests: dict[int, str] = {}
        self.crash_next: set[str] = set()
        self.max_commit = 0
        self.reads: dict[bytes, int] = {}
        self.proposal_no = 0
        self.totals = Totals()
        for node in self.nodes.values():
            self._start(node)
        for i in self.ids:
            self._at(self.rng.random(), "tick", i)

    # -- plumbing -----------------------------------------------------------------------

    def _at(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), kind, payload))

    def fail(self, what: str) -> SimFailure:
        return SimFailure(f"seed {self.seed} (n={len(self.ids)}) step {self.totals.steps}: {what}")

    def _start(self, node: SimNode) -> None:
        restored, commit = node.storage.restored()
        core = RaftCore(node.id, self.ids, self.config, random.Random(self.rng.random()), restored)
        # The shell replays the snapshot and the committed entries before it starts.
        snap = node.storage.snapshot
        state = snap.data.decode() if snap.index else ""
        for e in restored.entries:
            if e.index > commit:
                break
            state = self._apply_one(node, e, state)
        node.state = state
        node.applied = commit
        if restored.recovering:
            node.applied_before_crash = commit  # a damaged journal may serve less (not fresh)
        if commit < node.applied_before_crash:
            raise self.fail(f"{node.id} restarted with {commit} applied, had {node.applied_before_crash}")
        node.core = core
        node.last_role = core.role

    def _apply_one(self, node: SimNode, e: Entry, state: str) -> str:
        known = self.committed.get(e.index)
        if known is None:
            self.committed[e.index] = (e.term, e.data)
            self.max_committed_index = max(self.max_committed_index, e.index)
            self.totals.committed += 1
        elif known != (e.term, e.data):
            raise self.fail(f"{node.id} applies {e.index}/{e.term} {e.data!r}, committed was {known}")
        state = _digest(state, e.index, e.data) if e.kind is EntryKind.NORMAL else state
        digest = self.digests.setdefault(e.index, state)
        if digest != state:
            raise self.fail(f"{node.id} state after {e.index} differs from another node's")
        return state

    # -- one node's Ready ---------------------------------------------------------------------

    def _handle_ready(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        while core.has_ready():
            if node.id in self.crash_next:
                # Crash in the middle of this Ready: part of it reaches the disk, none of it
                # is sent or applied.
                self.crash_next.discard(node.id)
                node.storage.persist(core.ready(), self.rng)
                self._crash_now(node)
                return
            rd = core.ready()
            self._check_entries(node, rd)
            node.storage.persist(rd)
            for m in rd.messages:
                self._send(m)
            if rd.snapshot is not None:
                node.state = rd.snapshot.data.decode()
                node.applied = rd.snapshot.index
                self.totals.snapshots_installed += 1
                known = self.committed.get(rd.snapshot.index)
                if known is not None and known[0] != rd.snapshot.term:
                    raise self.fail(f"{node.id} installs snapshot {rd.snapshot.index}/{rd.snapshot.term}")
            for e in rd.committed:
                if e.index != node.applied + 1:
                    raise self.fail(f"{node.id} applies {e.index} after {node.applied}")
                node.state = self._apply_one(node, e, node.state)
                node.applied = e.index
            node.applied_before_crash = max(node.applied_before_crash, node.applied)
            for rs in rd.read_states:
                floor = self.reads.pop(rs.context, None)
                if floor is not None and rs.index < floor:
                    raise self.fail(f"{node.id} ReadIndex {rs.index} below commit {floor} at request")
                self.totals.reads_answered += 1
            core.advance(rd)
            if node.applied - core.log.offset >= node.compact_every:
                snap = Snapshot(node.applied, core.log.term(node.applied) or 0, 0.0, node.state.encode())
                core.compact(node.applied, snap)
                node.storage.compact(snap)
        self.max_commit = max(self.max_commit, core.committed)
        if core.committed > core.log.last_index():
            raise self.fail(f"{node.id} commit beyond its log")
        if core.role is Role.LEADER:
            owner = self.leaders.setdefault(core.term, node.id)
            if owner != node.id:
                raise self.fail(f"two leaders in term {core.term}: {owner} and {node.id}")
            if node.last_role is not Role.LEADER:
                self.totals.elections += 1
                self._check_leader_complete(node)
        node.last_role = core.role

    def _check_entries(self, node: SimNode, rd: Ready) -> None:
        core = node.core
        assert core is not None
        for e in rd.entries:
            prev_term = core.log.term(e.index - 1)
            if prev_term is None:
                continue
            ident = (e.data, prev_term)
            known = self.entry_ids.setdefault((e.index, e.term), ident)
            if known != ident:
                raise self.fail(f"log matching: {e.index}/{e.term} is {ident} on {node.id}, was {known}")

    def _check_leader_complete(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        if self.max_committed_index > core.log.last_index():
            raise self.fail(f"new leader {node.id} log ends before committed {self.max_committed_index}")
        snap = core.log.snapshot
        known = self.committed.get(snap.index)
        if snap.index and known is not None and known[0] != snap.term:
            raise self.fail(f"new leader {node.id} snapshot {snap.index}/{snap.term} is not committed")
        for index in range(core.log.offset + 1, self.max_committed_index + 1):
            entry = self.committed.get(index)
            if entry is not None and core.log.term(index) != entry[0]:
                raise self.fail(f"new leader {node.id} (term {core.term}) lacks committed {index}/{entry[0]}")

    # -- network ------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        if (m.src, m.dst) in self.blocked or self.rng.random() < self.loss:
            self.totals.dropped += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(0.05, 1.5) if self.rng.random() > 0.02 else self.rng.uniform(2, 15)
            self._at(self.now + delay, "deliver", m)

    # -- faults and workload ---------------------------------------------------------------------

    def heal(self) -> None:
        self.crash_next.clear()
        self.blocked.clear()
        self.loss = 0.0
        self.dup = 0.0

    def random_fault(self) -> None:
        r = self.rng.random()
        ids = list(self.ids)
        self.rng.shuffle(ids)
        self.heal()
        self.loss = self.rng.choice([0.0, 0.0, 0.05, 0.2])
        self.dup = self.rng.choice([0.0, 0.02, 0.1])
        if r < 0.2:
            cut = self.rng.randrange(1, len(ids))
            self._split(ids[:cut], ids[cut:])
        elif r < 0.35:
            a, b = ids[0], ids[1]
            self.blocked.add((a, b))
        elif r < 0.5:
            # bridge: ids[0] talks to everyone; the two sides do not talk to each other.
            rest = ids[1:]
            half = max(1, len(rest) // 2)
            self._split(rest[:half], rest[half:])
        elif r < 0.6:
            leader = self.current_leader()
            if leader is not None:
                self._split([leader], [i for i in self.ids if i != leader])
        elif r < 0.75:
            self.crash(self.rng.choice(self.ids), torn=self.rng.random() < 0.5)
        elif r < 0.8 and self.damage_enabled:
            self.damage_one()
        # else: only loss/duplication

    def _split(self, a: list[str], b: list[str]) -> None:
        for x in a:
            for y in b:
                self.blocked.add((x, y))
                self.blocked.add((y, x))

    def crash(self, node_id: str, torn: bool) -> None:
        node = self.nodes[node_id]
        if node.core is None:
            return
        if torn:
            self.crash_next.add(node_id)
        else:
            self._crash_now(node)

    def damage_one(self) -> None:
        """Crash a node and damage its journal, if no other node is damaged or recovering
        (a majority of damaged nodes cannot elect anyone: by design they do not vote)."""
        if any(n.storage.damaged or (n.core is not None and n.core.recovering) for n in self.nodes.values()):
            return
        node = self.nodes[self.rng.choice(self.ids)]
        if node.core is None:
            return
        self._crash_now(node)
        node.storage.damage(self.rng, lose_vote=self.lose_votes and self.rng.random() < 0.3)
        self.totals.damaged += 1

    def _crash_now(self, node: SimNode) -> None:
        node_id = node.id
        node.core = None
        self.totals.crashes += 1
        self._at(self.now + self.rng.uniform(1, 60), "restart", node_id)

    def current_leader(self) -> str | None:
        best: tuple[int, str] | None = None
        for n in self.nodes.values():
            if n.core is not None and n.core.role is Role.LEADER and (best is None or n.core.term > best[0]):
                best = (n.core.term, n.id)
        return best[1] if best else None

    def propose(self, node_id: str) -> str | None:
        node = self.nodes[node_id]
        if node.core is None or node.core.role is not Role.LEADER:
            return None
        self.proposal_no += 1
        payload = f"p{self.proposal_no}@{node_id}"
        try:
            node.core.propose([payload.encode()], self.now)
        except ProposalRefused:
            return None
        self.totals.proposals += 1
        self._handle_ready(node)
        return payload

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> None:
        when, _, kind, payload = heapq.heappop(self.queue)
        self.now = when
        self.totals.steps += 1
        if kind == "tick":
            node = self.nodes[payload]
            self._at(self.now + 1.0, "tick", payload)
            if node.core is not None:
                node.core.tick(self.now)
                self._handle_ready(node)
            return
        if kind == "deliver":
            m: Message = payload
            node = self.nodes[m.dst]
            if node.core is not None:
                self.totals.delivered += 1
                node.core.step(m)
                self._handle_ready(node)
            return
        if kind == "restart":
            node = self.nodes[payload]
            if node.core is None:
                self._start(node)
                self._handle_ready(node)
            return
        raise AssertionError(kind)

    def workload(self) -> None:
        r = self.rng.random()
        target = self.rng.choice(self.ids)
        node = self.nodes[target]
        if node.core is None:
            return
        if r < 0.7:
            self.propose(target)
        elif r < 0.9:
            context = f"r{next(self.seq)}".encode()
            if node.core.read_index(context):
                self.reads[context] = self.max_commit
                self._handle_ready(node)
        elif node.core.role is Role.LEADER:
            node.core.transfer_leadership(self.rng.choice([i for i in self.ids if i != target]))
            self._handle_ready(node)

    def run(self, steps: int) -> Totals:
        next_fault = self.rng.uniform(20, 80)
        next_work = 0.0
        while self.totals.steps < steps:
            if self.now >= next_fault:
                self.random_fault()
                next_fault = self.now + self.rng.uniform(20, 120)
            if self.now >= next_work:
                self.workload()
                next_work = self.now + self.rng.expovariate(2.0)
            self.step()
        self.check_liveness()
        return self.totals

    def check_liveness(self) -> None:
        self.heal()
        for node in self.nodes.values():
            if node.core is None:
                self._start(node)
                self._handle_ready(node)
        deadline = self.now + 400
        payloads: set[bytes] = set()
        next_try = self.now
        while self.now < deadline:
            self.step()
            leader = self.current_leader()
            # A proposal may be lost with a leader change; propose again now and then.
            if leader is not None and self.now >= next_try:
                payload = self.propose(leader)
                if payload is not None:
                    payloads.add(payload.encode())
                    next_try = self.now + 50
            done = [i for i, (_, d) in self.committed.items() if d in payloads]
            if done and all(n.applied >= min(done) for n in self.nodes.values()):
                return
        raise self.fail(f"no progress after healing (leader {self.current_leader()}, proposals {payloads})")


def main(argv: list[str]) -> int:
    seed = int(argv[1])
    steps = int(argv[2]) if len(argv) > 2 else 100_000
    n = int(argv[3]) if len(argv) > 3 else 3
    print(Simulation(seed, n).run(steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
