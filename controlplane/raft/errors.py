"""The errors of the engine's public API: what failed, and whether the write may have happened.

- Definitely not committed (safe to retry): `NoLeaderError`, `NotLeaderError`,
  `DiskFailedError`, `QueueFullError`, `StoppedError` raised before the proposal was
  handed to a leader, `ProposalDroppedError` (another entry was committed at its index).
- Outcome unknown (it may still commit): `CommitTimeoutError`.
"""

from __future__ import annotations

from controlplane.errors import ControlplaneError


class RaftError(ControlplaneError):
    """Base of every engine error (rooted, like every error of the package, in `errors.py`)."""


class RaftConfigError(RaftError, ValueError):
    """Bad settings; the message lists every problem as `path.field: what (got value)`."""


class RaftBindError(RaftError):
    """The node cannot listen on its address."""


class NoLeaderError(RaftError):
    """No leader is known right now (an election is under way, or no quorum)."""


class NotLeaderError(RaftError):
    """The node asked refused (it is not the leader, or leadership is being transferred)."""


class DiskFailedError(RaftError):
    """This node cannot write its journal; it takes no writes until the disk recovers."""


class QueueFullError(RaftError):
    """Too many proposals are in flight on this node."""


class EntryTooLargeError(RaftError, ValueError):
    """The proposal is larger than `RaftLimits.max_entry_bytes`."""


class StoppedError(RaftError):
    """The node is stopped (or stopping)."""


class CommitTimeoutError(RaftError):
    """Not applied here in time. The outcome is unknown: the entry may still commit."""


class ProposalDroppedError(RaftError):
    """A different entry was committed at the proposal's index: it will never commit."""


class ReadTimeoutError(RaftError):
    """A ReadIndex round did not complete in time."""
