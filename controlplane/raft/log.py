"""The in-memory Raft log of one node: a snapshot base, the entries after it, and marks.

Marks, always `snapshot.index <= applied <= committed <= last_index`:

- `committed`: known committed; only ever grows;
- `applied`: handed to the state machine (through a Ready); only ever grows;
- `stable`: entries up to here are persisted by the shell; later ones are in the next Ready.

Guarantee: an entry at or below `committed` is never removed or replaced. Every path
that would (a conflicting append, a snapshot restore) checks it and raises
`LogSafetyError` instead; in a correct cluster that cannot happen (Raft's Leader
Completeness), so the exception means a bug or a byzantine peer, and it is loud.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.errors import ControlplaneError
from controlplane.raft.messages import Entry, Snapshot


class LogSafetyError(ControlplaneError):
    """An operation would have removed or replaced a committed entry. It was refused."""


class RaftLog:
    def __init__(self, snapshot: Snapshot, entries: Sequence[Entry], committed: int, applied: int) -> None:
        self.snapshot = snapshot
        self._entries: list[Entry] = list(entries)
        for n, e in enumerate(self._entries):
            if e.index != snapshot.index + 1 + n:
                raise ValueError(f"entries must follow the snapshot contiguously (entry {e.index} at {n})")
        self.committed = max(committed, snapshot.index)
        if self.committed > self.last_index():
            raise ValueError(f"commit {committed} is beyond the last index {self.last_index()}")
        self.applied = max(applied, snapshot.index)
        if self.applied > self.committed:
            raise ValueError(f"applied {applied} is beyond commit {self.committed}")
        self.stable = self.last_index()
        # A snapshot received from the leader that the shell has yet to persist and restore.
        self.pending_snapshot: Snapshot | None = None

    # -- reading --------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return self.snapshot.index

    def first_index(self) -> int:
        return self.snapshot.index + 1

    def last_index(self) -> int:
        return self.snapshot.index + len(self._entries)

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot.term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`; None when compacted away or not there yet."""
        if index == self.snapshot.index:
            return self.snapshot.term
        if index < self.snapshot.index or index > self.last_index():
            return None
        return self._entries[index - self.snapshot.index - 1].term

    def entry(self, index: int) -> Entry:
        return self._entries[index - self.snapshot.index - 1]

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft section 5.4.1: is a log ending at (last_index, last_term) at least as up to date?"""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def slice(self, lo: int, max_entries: int, max_bytes: int) -> list[Entry] | None:
        """Entries from `lo` on, bounded (at least one if any); None when `lo` is compacted."""
        if lo <= self.snapshot.index:
            return None
        out: list[Entry] = []
        size = 0
        for i in range(lo, min(self.last_index(), lo + max_entries - 1) + 1):
            e = self.entry(i)
            size += e.size()
            if out and size > max_bytes:
                break
            out.append(e)
        return out

    def unstable(self) -> list[Entry]:
        return self._entries[self.stable - self.snapshot.index :]

    def next_committed(self, max_entries: int) -> list[Entry]:
        """Committed entries not yet handed out for applying (after any pending snapshot)."""
        lo = self.applied + 1
        hi = min(self.committed, self.applied + max_entries)
        if hi < lo:
            return []
        return self._entries[lo - self.snapshot.index - 1 : hi - self.snapshot.index]

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term` (etcd's probing shortcut)."""
        index = min(index, self.last_index())
        while index > self.snapshot.index:
            t = self.entry(index).term
            if t <= term:
                return index, t
            index -= 1
        return self.snapshot.index, self.snapshot.term

    # -- changing -------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append (leader path): entries must follow the last index."""
        for e in entries:
            if e.index != self.last_index() + 1:
                raise ValueError(f"append of {e.index} after {self.last_index()}")
            self._entries.append(e)

    def maybe_append(self, prev_index: int, prev_term: int, entries: Sequence[Entry]) -> int | None:
        """Follower path. None if the log does not hold (prev_index, prev_term); otherwise
        store `entries` after it (replacing a conflicting suffix) and return the last index
        now known to match the sender's log: prev_index + len(entries)."""
        if not self.match_term(prev_index, prev_term):
            return None
        for n, e in enumerate(entries):
            if e.index != prev_index + 1 + n:
                raise ValueError(f"entries not contiguous after {prev_index}")
            existing = self.term(e.index)
            if existing == e.term:
                continue
            if existing is not None:
                self._truncate_from(e.index)
            self._entries.extend(entries[n:])
            break
        return prev_index + len(entries)

    def _truncate_from(self, index: int) -> None:
        if index <= self.committed:
            raise LogSafetyError(
                f"refusing to replace entry {index}: it is committed (commit {self.committed}); "
                "a leader sent a log that conflicts with committed entries"
            )
        del self._entries[index - self.snapshot.index - 1 :]
        self.stable = min(self.stable, index - 1)

    def commit_to(self, index: int) -> bool:
        if index <= self.committed:
            return False
        if index > self.last_index():
            raise LogSafetyError(f"commit {index} beyond the last index {self.last_index()}")
        self.committed = index
        return True

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot from the leader (its index is committed)."""
        if snapshot.index <= self.committed:
            raise LogSafetyError(f"snapshot {snapshot.index} is not past commit {self.committed}")
        self.snapshot = snapshot
        self._entries = []
        self.committed = snapshot.index
        self.stable = snapshot.index
        self.pending_snapshot = snapshot

    def compact(self, index: int, snapshot: Snapshot) -> None:
        """Drop entries up to `index`, which the application has snapshotted (`snapshot`)."""
        if index <= self.snapshot.index:
            return
        if index > self.applied:
            raise ValueError(f"cannot compact to {index}: only {self.applied} applied")
        if snapshot.index != index or snapshot.term != self.term(index):
            raise ValueError(f"snapshot ({snapshot.index}, {snapshot.term}) does not match entry {index}")
        del self._entries[: index - self.snapshot.index]
        self.snapshot = snapshot
        self.stable = max(self.stable, index)
