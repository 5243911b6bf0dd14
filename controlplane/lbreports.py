"""What the load balancers told this agent: the latest report per LB, and how each stands.

A load balancer adapter (`controlplane lb haproxy|nginx`) reports to every agent it
follows (`POST /v1/lbs/{name}`): the revision it applied, when, and its error if any,
like an xDS ACK/NACK. Each agent keeps the reports it received in memory; nothing is
replicated, since every adapter reports to every agent. Drills measure recovery up to
these reports, and `GET /v1/lbs`, `cpctl status` and the `controlplane_lb_*` metrics
show them.

Bounded: at most `MAX_LBS` names (a new one past that is refused with 429, names
already known still update), and a report is dropped once no report came from its LB
for `expiry_s(heartbeat_s)`: ten of its heartbeats, and never less than a floor (60 s
by default) so that an adapter restarting is not forgotten.

The state of an LB, judged against the decision this agent serves (first rule that
holds):

- `silent`: no report for 3 heartbeats (whatever the last one said);
- `failing`: its last report says not ok, or carries an error;
- `in-sync`: it applied this agent's revision (or a later one), in this epoch;
- `applying`: it is behind, but the current decision is younger than 2 heartbeats,
  the time a healthy adapter is given to apply it and say so;
- `lagging`: it is behind, and the current decision is older than that.

"Behind by" (`lag_revisions`) is the current revision minus the applied one; an LB that
applied nothing of the current epoch (nothing at all, or a revision of a cluster state
since rebuilt) is behind by every revision of it.

Pure: no clock is read here; every call takes `now` (this agent's own clock, only
compared with itself) and the decision's age (measured in the cluster's clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from controlplane.errors import ControlplaneError

MAX_LBS = 1024
MIN_EXPIRY_S = 60.0
EXPIRY_HEARTBEATS = 10
SILENT_HEARTBEATS = 3
GRACE_HEARTBEATS = 2
ERROR_MAX_CHARS = 500

NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)

STATES = ("in-sync", "applying", "lagging", "failing", "silent")


def valid_name(name: str) -> bool:
    """1-64 characters of letters, digits and `._@-` (`haproxy@lb-1.example.com`)."""
    return _NAME.fullmatch(name) is not None and name.isascii()


def expiry_s(heartbeat_s: float, min_expiry_s: float = MIN_EXPIRY_S) -> float:
    """How long a report is kept without a newer one: 10 heartbeats, at least the floor."""
    return max(EXPIRY_HEARTBEATS * heartbeat_s, min_expiry_s)


class TooManyLbs(ControlplaneError):
    """This agent keeps reports of `MAX_LBS` load balancers already; a new name must wait."""

    http_status = 429
    code = "too_many_lbs"


@dataclass(frozen=True, slots=True)
class LbReport:
    """One report, as the adapter sent it (validated by the API)."""

    adapter: str
    applied_revision: int | None
    applied_epoch: str | None
    applied_at: float | None
    desired_revision: int | None
    ok: bool | None
    error: str | None
    heartbeat_s: float

    @property
    def failing(self) -> bool:
        return self.ok is False or bool(self.error)


@dataclass(frozen=True, slots=True)
class Current:
    """The decision this agent serves: revision, epoch ("" when none) and age (cluster clock)."""

    revision: int | None
    epoch: str
    age_s: float | None


@dataclass(frozen=True, slots=True)
class LbView:
    """One LB as `GET /v1/lbs` and the metrics show it."""

    name: str
    report: LbReport
    reported_at: float
    age_s: float
    lag_revisions: int | None
    state: str

    @property
    def ok_metric(self) -> int | None:
        """`controlplane_lb_ok`: 0 when failing, 1 when ok, None before it said either."""
        if self.report.failing:
            return 0
        return 1 if self.report.ok else None

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "name": self.name,
            "adapter": r.adapter,
            "applied_revision": r.applied_revision,
            "applied_epoch": r.applied_epoch,
            "applied_at": r.applied_at,
            "desired_revision": r.desired_revision,
            "reported_at": self.reported_at,
            "age_s": round(self.age_s, 3),
            "ok": r.ok,
            "error": r.error,
            "heartbeat_s": r.heartbeat_s,
            "lag_revisions": self.lag_revisions,
            "state": self.state,
        }


@dataclass(frozen=True, slots=True)
class Entry:
    """The latest report of one LB and when this agent received it (its own clock)."""

    name: str
    report: LbReport
    reported_at: float

    def lag_revisions(self, current: Current) -> int | None:
        if current.revision is None:
            return None
        r = self.report
        if r.applied_revision is None or (r.applied_epoch or "") != current.epoch:
            return current.revision
        return max(0, current.revision - r.applied_revision)

    def state(self, current: Current, now: float) -> str:
        r = self.report
        if now - self.reported_at > SILENT_HEARTBEATS * r.heartbeat_s:
            return "silent"
        if r.failing:
            return "failing"
        lag = self.lag_revisions(current)
        if not lag:
            return "in-sync"
        if current.age_s is not None and current.age_s < GRACE_HEARTBEATS * r.heartbeat_s:
            return "applying"
        return "lagging"

    def view(self, current: Current, now: float) -> LbView:
        return LbView(
            name=self.name,
            report=self.report,
            reported_at=self.reported_at,
            age_s=max(0.0, now - self.reported_at),
            lag_revisions=self.lag_revisions(current),
            state=self.state(current, now),
        )


class LbRegistry:
    """The latest report per LB name, at most `limit` names, each dropped at its expiry."""

    def __init__(self, limit: int = MAX_LBS, min_expiry_s: float = MIN_EXPIRY_S) -> None:
        self.limit = limit
        self.min_expiry_s = min_expiry_s
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, name: str, report: LbReport, now: float) -> Entry:
        """Keep `report` as `name`'s latest; `TooManyLbs` for a new name past the limit."""
        if name not in self._entries and len(self._entries) >= self.limit:
            self.expire(now)
            if len(self._entries) >= self.limit:
                raise TooManyLbs(
                    "too many load balancers",
                    f"this agent keeps the reports of {self.limit} load balancers already; "
                    f"{name} is refused until one of them expires (no report for "
                    f"{EXPIRY_HEARTBEATS} heartbeats, at least {self.min_expiry_s:g} s)",
                )
        entry = Entry(name, report, now)
        self._entries[name] = entry
        return entry

    def expire(self, now: float) -> list[str]:
        """Drop the reports whose LB has not reported for its expiry; their names."""
        gone = [
            name
            for name, e in self._entries.items()
            if now - e.reported_at > expiry_s(e.report.heartbeat_s, self.min_expiry_s)
        ]
        for name in gone:
            del self._entries[name]
        return gone

    def entries(self, now: float) -> list[Entry]:
        """The reports still kept at `now`, by name."""
        self.expire(now)
        return sorted(self._entries.values(), key=lambda e: e.name)
