"""The words of the Raft core: entries, hard state, snapshots, messages and the Ready batch.

Everything here is an immutable value, so the core can hand it to the shell (another
layer, possibly another thread) without copying and without the shell being able to
change the core's state behind its back. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NodeId = str


class EntryKind(enum.IntEnum):
    NORMAL = 0
    # The empty entry a new leader appends to commit the entries of earlier terms
    # (Raft paper, section 5.4.2). Never handed to the state machine.
    NOOP = 1


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    # Cluster time when the leader appended the entry (see controlplane/raft/clock.py).
    ctime: float
    data: bytes
    kind: EntryKind = EntryKind.NORMAL

    def size(self) -> int:
        """Approximate encoded size, for flow control and compaction thresholds."""
        return len(self.data) + 32


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application state as of `index` (whose entry had `term` and `ctime`)."""

    index: int = 0
    term: int = 0
    ctime: float = 0.0
    data: bytes = b""


class MsgType(enum.IntEnum):
    APP = 1
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    SNAP = 7
    HEARTBEAT = 8
    HEARTBEAT_RESP = 9
    READ_INDEX = 10
    READ_INDEX_RESP = 11
    TIMEOUT_NOW = 12


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message. Field meanings follow etcd-io/raft's raftpb.Message.

    - APP: `index`/`log_term` are the entry preceding `entries`; `commit` the leader's.
    - APP_RESP: `index` is the last index that matched (or the rejected `index` with
      `reject`, and `reject_hint`/`log_term` say where the follower's log may match).
    - VOTE/PRE_VOTE: `index`/`log_term` are the candidate's last entry; `force` is set
      by a leadership transfer and skips the lease check.
    - HEARTBEAT(_RESP), READ_INDEX(_RESP): `context` identifies a ReadIndex request.
    - `ctime`/`wall` are not used by the core: the shell stamps the leader's cluster time
      and wall clock on what it sends, for followers' clocks (see clock.py); followers
      echo the leader's last `wall` in APP_RESP/HEARTBEAT_RESP, so the leader knows when
      it asked what they answered (its lease; see node.py).
    """

    type: MsgType
    src: NodeId
    dst: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""
    force: bool = False
    ctime: float = 0.0
    wall: float = 0.0


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: reads are linearizable once `index` has been applied here."""

    index: int
    context: bytes


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Ready:
    """What the shell must do, in this order, before calling `RaftCore.advance(ready)`:

    1. persist `hard_state` (when not None), `snapshot` (when not None) and `entries`
       (which replace any stored entries from `entries[0].index` on), durably (fsync);
    2. only then send `messages` (they may promise that state, e.g. a vote or an ack);
    3. restore `snapshot` into the state machine, then apply `committed` in order;
    4. answer `read_states` once their index is applied.
    """

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    committed: tuple[Entry, ...]
    messages: tuple[Message, ...]
    read_states: tuple[ReadState, ...]
    role: Role
    leader: NodeId | None
    term: int
    # The commit index the stored state will have once this Ready is persisted.
    commit: int = 0
