"""What a `RaftNode` shows other threads: immutable status values, and the state machine contract.

The engine thread publishes a `Published` value after every tick and every Ready (one
reference assignment, atomic in CPython); `status_of` turns it into a `RaftStatus` in the
caller's thread, measuring ages against the caller's monotonic clock. So a frozen engine
cannot keep looking healthy: within a second of its last tick `fresh` and `has_quorum`
read False, whatever it last published.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.raft.clock import ClockReading
from controlplane.raft.messages import Role

# A status older than this means the engine thread stopped ticking.
ENGINE_STALE_S = 1.0


class StateMachine(Protocol):
    def apply(self, index: int, term: int, ctime: float, data: bytes) -> object:
        """Apply one committed entry (engine thread, log order). Must be deterministic and
        must not raise: an exception is logged at ERROR and handed to the proposer, and the
        node carries on (every node raises the same way, if apply is deterministic)."""
        ...

    def snapshot(self) -> bytes:
        """The state as of the last applied index."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the state by a snapshot's (b"" is the empty state)."""
        ...


@dataclass(frozen=True, slots=True)
class MemberStatus:
    id: str
    dial: str
    connected_out: bool
    connected_in: bool
    last_heard_s: float | None  # seconds since anything authenticated came from it
    match: int | None  # leader only: the last index known replicated there


@dataclass(frozen=True, slots=True)
class RaftStatus:
    id: str
    role: str
    leader: str | None
    term: int
    commit: int
    applied: int
    members: tuple[MemberStatus, ...]
    has_quorum: bool
    fresh: bool
    recovering: bool
    vote_unknown: bool
    disk_error: str | None
    ticked_at: float  # time.monotonic() of the engine's last tick
    cluster_time: float | None
    clock_skew_s: float | None  # leader wall clock minus ours (followers), RTT-corrected
    counters: Mapping[str, int]
    damage: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Published:
    """What the engine thread last published; other threads read only this."""

    role: Role = Role.FOLLOWER
    leader: str | None = None
    term: int = 0
    commit: int = 0
    applied: int = 0
    members: tuple[MemberStatus, ...] = ()
    has_quorum: bool = False
    fresh_until: float = 0.0
    recovering: bool = False
    vote_unknown: bool = False
    disk_error: str | None = None
    ticked_at: float = 0.0
    clock: ClockReading = field(default_factory=lambda: ClockReading(None, 0.0, 0.0))
    clock_skew_s: float | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    damage: tuple[str, ...] = ()


def is_fresh(pub: Published, now: float) -> bool:
    """Whether this node may call what it serves fresh (see `RaftStatus.fresh`)."""
    return (
        now - pub.ticked_at < ENGINE_STALE_S
        and now < pub.fresh_until
        and not pub.recovering
        and pub.disk_error is None
    )


def status_of(node_id: str, pub: Published, now: float) -> RaftStatus:
    engine_alive = now - pub.ticked_at < ENGINE_STALE_S
    return RaftStatus(
        id=node_id,
        role=pub.role.value,
        leader=pub.leader,
        term=pub.term,
        commit=pub.commit,
        applied=pub.applied,
        members=pub.members,
        has_quorum=pub.has_quorum and engine_alive,
        fresh=is_fresh(pub, now),
        recovering=pub.recovering,
        vote_unknown=pub.vote_unknown,
        disk_error=pub.disk_error,
        ticked_at=pub.ticked_at,
        cluster_time=pub.clock.at(now),
        clock_skew_s=pub.clock_skew_s,
        counters=pub.counters,
        damage=pub.damage,
    )
