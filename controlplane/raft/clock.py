"""Cluster time: a clock that no node's wall clock can move (issue 13 item 4).

The first leader of a new cluster seeds it from its wall clock. From then on the
leader's cluster clock is the value it continued from plus the monotonic time elapsed
on the leader; every append and heartbeat carries it, every entry is stamped with it.
A follower's estimate is the last cluster time heard from the leader plus its own
monotonic time since. A new leader continues from its own estimate, and never from
below the newest entry's stamp, so cluster time never goes backwards in the log.

Freshness and holds measured in cluster time are immune to any node's wall clock being
off: only monotonic clocks (which cannot jump) and the leader's stamps enter it.

This module is pure: callers pass `mono` (time.monotonic()) and `wall` (time.time()).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClockReading:
    """An immutable view of the clock, safe to read from any thread."""

    base_ctime: float | None
    base_mono: float
    floor: float

    def at(self, mono: float) -> float | None:
        if self.base_ctime is None:
            return None
        return max(self.floor, self.base_ctime + (mono - self.base_mono))


class ClusterClock:
    def __init__(self) -> None:
        self._reading = ClockReading(None, 0.0, 0.0)

    @property
    def reading(self) -> ClockReading:
        return self._reading

    def now(self, mono: float) -> float | None:
        return self._reading.at(mono)

    def observe_leader(self, ctime: float, mono: float) -> None:
        """A message from the current leader carried its cluster time."""
        if ctime <= 0:
            return
        current = self._reading.at(mono)
        # Never backwards: a late message must not pull the estimate back.
        base = ctime if current is None else max(ctime, current)
        self._reading = ClockReading(base, mono, self._reading.floor)

    def raise_floor(self, ctime: float) -> None:
        """An applied entry (or installed snapshot) carried `ctime`."""
        if ctime > self._reading.floor:
            r = self._reading
            self._reading = ClockReading(r.base_ctime, r.base_mono, ctime)

    def become_leader(self, mono: float, wall: float, last_entry_ctime: float) -> float:
        """Continue from our estimate (or the log), seeding from the wall clock only for a
        brand-new cluster. Returns the cluster time now."""
        current = self._reading.at(mono)
        floor = max(self._reading.floor, last_entry_ctime)
        base = (floor if floor > 0 else wall) if current is None else max(current, floor)
        self._reading = ClockReading(base, mono, floor)
        return base
