"""What one running agent is: its settings, its store, its metrics, its clock.

The HTTP API and the agent's loops share a `Node`; tests can build one around any
`ControlStore`. It holds no logic of its own beyond reading the latest committed view.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from controlplane.access import Tokens
from controlplane.agent.feed import RevisionFeed
from controlplane.config import Settings
from controlplane.consensus.base import ControlStore
from controlplane.errors import Overloaded
from controlplane.lbreports import Current, LbRegistry, LbView
from controlplane.metrics import Metrics
from controlplane.state import ControlState, StoreStatus

__all__ = ["Node", "Tokens"]


@dataclass
class Node:
    settings: Settings
    agent_id: str
    store: ControlStore
    metrics: Metrics
    tokens: Tokens = field(default_factory=Tokens)
    # The watcher cap in force: api.max_watchers, lowered to fit the connection cap.
    max_watchers: int | None = None
    # This agent's wall clock: for its own ages (uptime, how long stale), never compared
    # with another agent's. Verdicts, holds and ramps use `cluster_now()`.
    clock: Callable[[], float] = time.time
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    feed: RevisionFeed = field(init=False)
    # What the load balancers reported to this agent (not replicated: they report to
    # every agent).
    lbs: LbRegistry = field(init=False)
    watchers: int = 0
    # (revision, JSON body, SSE event) of the served decision, shared by every reader.
    encoded: tuple[int, bytes, bytes] | None = None

    def __post_init__(self) -> None:
        self.feed = RevisionFeed(self.store, lambda: self.stale_for_s() is not None)
        # Read at scrape time: opening and closing a watcher costs no gauge lock (issue 15).
        self.metrics.watchers.set_function(lambda: self.watchers)
        self.lbs = LbRegistry(min_expiry_s=self.settings.model.api.lb_report_min_expiry_s)
        self.metrics.lb_reports.set_source(self.lb_views)
        self.metrics.drills.follow(lambda: self.store.state().drills)

    @contextlib.contextmanager
    def watcher(self) -> Iterator[None]:
        """Count one blocking query or stream; `Overloaded` past `api.max_watchers`."""
        limit = self.max_watchers or self.settings.model.api.max_watchers
        if self.watchers >= limit:
            raise Overloaded(
                "too many watchers", f"this agent holds its limit of {limit}; retry or use another agent"
            )
        self.watchers += 1
        try:
            yield
        finally:
            self.watchers -= 1

    def state(self) -> ControlState:
        return self.store.state()

    def status(self) -> StoreStatus:
        return self.store.status()

    def cluster_now(self) -> float | None:
        """The cluster's clock as this agent knows it (None before it heard a leader)."""
        return self.store.cluster_time()

    def cluster_now_or_wall(self) -> float:
        """The cluster's clock, or this agent's wall clock while it knows no cluster clock
        (only for what-if answers: nothing is committed on it)."""
        now = self.store.cluster_time()
        return now if now is not None else self.clock()

    def stale_for_s(self) -> float | None:
        """Seconds since this agent lost quorum; None while it has it."""
        has_quorum, lost_at = self.store.quorum()
        if has_quorum:
            return None
        since = lost_at if lost_at is not None else self.started_at
        return max(0.0, self.clock() - since)

    def lb_current(self) -> Current:
        """The decision the load balancers are judged against: the one this agent serves."""
        decision = self.state().decision
        if decision is None:
            return Current(revision=None, epoch="", age_s=None)
        age_s = max(0.0, self.cluster_now_or_wall() - decision.committed_at)
        return Current(revision=decision.revision, epoch=decision.epoch, age_s=age_s)

    def lb_views(self) -> list[LbView]:
        """Every load balancer's latest report and state, by name (expired ones dropped)."""
        now = self.clock()
        current = self.lb_current()
        return [entry.view(current, now) for entry in self.lbs.entries(now)]

    def http_address_of(self, agent_id: str | None) -> str | None:
        for agent in self.settings.cluster.agents:
            if agent.id == agent_id:
                return agent.http
        return None
