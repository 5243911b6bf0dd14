"""The project's own Raft engine (issue 12): a pure core, a checksummed journal, an
authenticated transport and a threaded shell. Generic: it knows nothing about regions.

Modules, from the inside out:

- `messages`, `quorum`, `log`, `progress`, `core`: the pure, deterministic state machine
  (no I/O, no clock, no threads), after etcd-io/raft;
- `codec`: msgpack only, strictly checked (nothing is ever unpickled);
- `storage`: the journal (crc32 per record, fdatasync per Ready, damage detection);
- `transport`: authenticated, bounded asyncio TCP;
- `clock`: cluster time, immune to wall clocks;
- `settings`, `errors`: typed settings and the public exceptions;
- `node`: `RaftNode`, the shell that runs it all on its own thread.
"""

from controlplane.raft.errors import (
    CommitTimeoutError,
    DiskFailedError,
    EntryTooLargeError,
    NoLeaderError,
    NotLeaderError,
    ProposalDroppedError,
    QueueFullError,
    RaftBindError,
    RaftConfigError,
    RaftError,
    ReadTimeoutError,
    StoppedError,
)
from controlplane.raft.node import RaftNode
from controlplane.raft.settings import RaftLimits, RaftTimings
from controlplane.raft.status import MemberStatus, RaftStatus, StateMachine

__all__ = [
    "CommitTimeoutError",
    "DiskFailedError",
    "EntryTooLargeError",
    "MemberStatus",
    "NoLeaderError",
    "NotLeaderError",
    "ProposalDroppedError",
    "QueueFullError",
    "RaftBindError",
    "RaftConfigError",
    "RaftError",
    "RaftLimits",
    "RaftNode",
    "RaftStatus",
    "RaftTimings",
    "ReadTimeoutError",
    "StateMachine",
    "StoppedError",
]
