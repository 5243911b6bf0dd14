"""Typed, immutable settings of the engine: timings (`RaftTimings`) and bounds (`RaftLimits`).

`problems()` returns every error as `backend.raft.FIELD: what is wrong (got VALUE)`, the
project's convention, so the daemon's config loader can list them all and start nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from controlplane.raft.core import CoreConfig


@dataclass(frozen=True, slots=True)
class RaftTimings:
    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 0.8
    heartbeat_s: float = 0.05
    # The engine thread's tick; the core counts time in ticks.
    tick_s: float = 0.01
    # A proposal not applied here within this long fails with CommitTimeoutError.
    commit_timeout_s: float = 5.0
    # A proposal forwarded to the leader must be answered (index assigned) within this.
    forward_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    handshake_timeout_s: float = 2.0
    # An authenticated connection silent for this long is closed (keepalives flow).
    idle_timeout_s: float = 3.0
    keepalive_s: float = 0.5
    # `status().fresh` holds for this long after a confirmation that this node had
    # applied everything the leader had committed.
    fresh_window_s: float = 1.0
    # How often a follower confirms (a ReadIndex round).
    fresh_probe_s: float = 0.15
    disk_retry_s: float = 0.5
    disk_reminder_s: float = 30.0
    # Take a snapshot and compact once the log since the last one exceeds either: the log
    # since the last snapshot is held in memory, and a snapshot of the control state is
    # small (the whole state, a few hundred KB), so both are kept low.
    snapshot_entries: int = 1000
    snapshot_bytes: int = 8 << 20

    def problems(self, prefix: str = "backend.raft") -> list[str]:
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                out.append(f"{prefix}.{f.name}: must be a number (got {value!r})")
            elif value <= 0:
                out.append(f"{prefix}.{f.name}: must be positive (got {value})")
        if out:
            return out
        if self.heartbeat_s > self.election_timeout_min_s / 3:
            out.append(
                f"{prefix}.heartbeat_s: must be below election_timeout_min_s / 3 (got {self.heartbeat_s})"
            )
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            out.append(
                f"{prefix}.election_timeout_max_s: must exceed election_timeout_min_s "
                f"(got {self.election_timeout_max_s})"
            )
        if self.tick_s > self.heartbeat_s:
            out.append(f"{prefix}.tick_s: must not exceed heartbeat_s (got {self.tick_s})")
        if self.keepalive_s * 2 > self.idle_timeout_s:
            out.append(f"{prefix}.keepalive_s: must be at most idle_timeout_s / 2 (got {self.keepalive_s})")
        if self.fresh_probe_s >= self.fresh_window_s:
            out.append(f"{prefix}.fresh_probe_s: must be below fresh_window_s (got {self.fresh_probe_s})")
        return out

    def ticks(self, seconds: float) -> int:
        return max(1, round(seconds / self.tick_s))


@dataclass(frozen=True, slots=True)
class RaftLimits:
    """Every queue and buffer of the engine has one of these bounds."""

    max_entry_bytes: int = 1 << 20
    max_pending_proposals: int = 10_000
    max_append_entries: int = 512
    max_append_bytes: int = 1 << 20
    max_inflight_appends: int = 64
    max_frame_bytes: int = 4 << 20
    snapshot_chunk_bytes: int = 1 << 20
    max_snapshot_bytes: int = 512 << 20
    peer_queue_messages: int = 4096
    peer_queue_bytes: int = 64 << 20
    max_connections: int = 128
    max_unauthenticated: int = 32
    max_pending_reads: int = 4096

    def problems(self, prefix: str = "backend.raft.limits") -> list[str]:
        out = [
            f"{prefix}.{f.name}: must be a positive integer (got {getattr(self, f.name)!r})"
            for f in fields(self)
            if type(getattr(self, f.name)) is not int or getattr(self, f.name) <= 0
        ]
        if out:
            return out
        if self.max_append_bytes + 4096 > self.max_frame_bytes:
            out.append(
                f"{prefix}.max_append_bytes: must leave room in max_frame_bytes (got {self.max_append_bytes})"
            )
        if self.snapshot_chunk_bytes + 4096 > self.max_frame_bytes:
            out.append(
                f"{prefix}.snapshot_chunk_bytes: must leave room in max_frame_bytes "
                f"(got {self.snapshot_chunk_bytes})"
            )
        if self.max_entry_bytes > self.max_append_bytes:
            out.append(
                f"{prefix}.max_entry_bytes: must not exceed max_append_bytes (got {self.max_entry_bytes})"
            )
        return out


def core_config(timings: RaftTimings, limits: RaftLimits) -> CoreConfig:
    return CoreConfig(
        election_ticks_min=timings.ticks(timings.election_timeout_min_s),
        election_ticks_max=timings.ticks(timings.election_timeout_max_s),
        heartbeat_ticks=timings.ticks(timings.heartbeat_s),
        max_append_entries=limits.max_append_entries,
        max_append_bytes=limits.max_append_bytes,
        max_inflight=limits.max_inflight_appends,
        max_pending_reads=limits.max_pending_reads,
    )
