"""Prometheus metrics of one agent, on a registry of its own.

Each agent (and each test) gets its own `CollectorRegistry`, so several agents can run
in one process in tests without clashing and nothing leaks between them. Names follow
Prometheus conventions: a `controlplane_` prefix, base units in the name (`_seconds`),
`_total` on counters. Gauges that mirror the decision are refreshed from the committed
decision with `observe_decision`, not incremented ad hoc, so they can never drift.

For diagnosis (issue 15): the standard `process_*` series (RSS, CPU, open fds, threads,
from /proc), `controlplane_build_info` (version, Python), and
`controlplane_asyncio_tasks{loop}`, the unfinished asyncio tasks of each event loop the
agent runs (`main`, `prober`), counted at scrape time: a count that only grows is a
leaked task.

Load balancers (issue 17): `controlplane_lb_applied_revision_lag{lb}`,
`controlplane_lb_report_age_seconds{lb}` and `controlplane_lb_ok{lb}`, computed at
scrape time from the reports this agent holds (`lbreports`), so an LB whose report
expired has no series left: the label set is bounded by the registry's bound.

Drills (issue 17): `controlplane_drill_last_*` are computed at scrape time from the
drill results in the replicated state (`DrillGauges`), so every agent shows the same
values and they survive restarts; a series is absent until there is a drill to show.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane import __version__
from controlplane.lbreports import LbView
from controlplane.model import Decision, State, Verdict
from controlplane.state import DrillRecord, StoreStatus

PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STATE_CODE = {State.HEALTHY: 0, State.DEGRADED: 1, State.DOWN: 2, State.DRAINED: 3}
VERDICT_CODE = {Verdict.UP: 0, Verdict.SLOW: 1, Verdict.DOWN: 2, Verdict.UNKNOWN: 3}


class TaskCounter(Collector):
    """`controlplane_asyncio_tasks{loop}`: unfinished tasks per registered loop, at scrape time."""

    def __init__(self) -> None:
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}

    def add_loop(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loops[name] = loop

    def remove_loop(self, name: str) -> None:
        self._loops.pop(name, None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "controlplane_asyncio_tasks", "Unfinished asyncio tasks per event loop", labels=["loop"]
        )
        for name, loop in list(self._loops.items()):
            if not loop.is_closed():
                # all_tasks() copes with a set that another thread changes meanwhile.
                family.add_metric([name], len(asyncio.all_tasks(loop)))
        yield family


class LbReportCollector(Collector):
    """The `controlplane_lb_*` gauges, one series per LB this agent holds a report of."""

    def __init__(self) -> None:
        self._source: Callable[[], Iterable[LbView]] | None = None

    def set_source(self, source: Callable[[], Iterable[LbView]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "controlplane_lb_applied_revision_lag",
            "Revisions the load balancer's applied decision is behind the one this agent serves",
            labels=["lb"],
        )
        age = GaugeMetricFamily(
            "controlplane_lb_report_age_seconds",
            "Seconds since the load balancer last reported to this agent",
            labels=["lb"],
        )
        ok = GaugeMetricFamily(
            "controlplane_lb_ok",
            "1 when the load balancer's last report says ok, 0 when it reports a failure",
            labels=["lb"],
        )
        for view in self._source() if self._source is not None else ():
            if view.lag_revisions is not None:
                lag.add_metric([view.name], view.lag_revisions)
            age.add_metric([view.name], view.age_s)
            if view.ok_metric is not None:
                ok.add_metric([view.name], view.ok_metric)
        yield lag
        yield age
        yield ok


class DrillGauges(Collector):
    """The last drills' results, read from the replicated state at scrape time.

    "Last" is by end time (the latest recorded wins a tie). Each family is always
    described, with a sample only when there is something to show: a cluster that never
    ran a drill (or never passed one) has no `..._last_passed_timestamp_seconds` sample,
    which the alert rules tell apart from an old one.
    """

    def __init__(self) -> None:
        self._drills: Callable[[], Sequence[DrillRecord]] = tuple

    def follow(self, drills: Callable[[], Sequence[DrillRecord]]) -> None:
        """Read the drills from `drills` (the node's applied state) at every scrape."""
        self._drills = drills

    def collect(self) -> Iterable[GaugeMetricFamily]:
        by_end = sorted(enumerate(self._drills()), key=lambda p: (p[1].ended_at, p[0]))
        last = by_end[-1][1] if by_end else None
        rtos = [d.rto_s for _, d in by_end if d.rto_s is not None]
        passed = [d for _, d in by_end if d.passed]
        rto = GaugeMetricFamily(
            "controlplane_drill_last_rto_seconds",
            "RTO of the last drill measured to the end (drill start to applied by every load balancer)",
        )
        if rtos:
            rto.add_metric([], rtos[-1])
        ended = GaugeMetricFamily(
            "controlplane_drill_last_timestamp_seconds", "When the last drill ended (Unix time)"
        )
        if last is not None:
            ended.add_metric([], last.ended_at)
        passed_at = GaugeMetricFamily(
            "controlplane_drill_last_passed_timestamp_seconds",
            "When the last drill that met its objective ended (Unix time); absent when none has",
        )
        if passed:
            passed_at.add_metric([], passed[-1].ended_at)
        yield from (rto, ended, passed_at)


class Metrics:
    def __init__(self, agent_id: str, registry: CollectorRegistry | None = None) -> None:
        self.agent_id = agent_id
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.build_info = Info("controlplane_build", "The agent's version and Python", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version(), "agent": agent_id})
        self.tasks = TaskCounter()
        r.register(self.tasks)
        self.lb_reports = LbReportCollector()
        r.register(self.lb_reports)
        self.drills = DrillGauges()
        r.register(self.drills)
        self.probe_duration = Histogram(
            "controlplane_probe_duration_seconds",
            "Duration of probes by this agent",
            ["region", "service", "observer"],
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.probe_failures = Counter(
            "controlplane_probe_failures_total",
            "Failed probes by this agent",
            ["region", "service", "observer"],
            registry=r,
        )
        self.probe_inconclusive = Counter(
            "controlplane_probe_inconclusive_total",
            "Probes by this agent that could not tell (e.g. Prometheus unreachable); not failures",
            ["region", "service", "observer"],
            registry=r,
        )
        self.verdict = Gauge(
            "controlplane_verdict",
            "Agreed verdict per service and region (0 up, 1 slow, 2 down, 3 unknown)",
            ["service", "region"],
            registry=r,
        )
        self.region_state = Gauge(
            "controlplane_region_state",
            "State per service and region (0 healthy, 1 degraded, 2 down, 3 drained)",
            ["service", "region"],
            registry=r,
        )
        self.weight = Gauge(
            "controlplane_weight", "Committed traffic weight (0-100)", ["service", "region"], registry=r
        )
        self.feature_enabled = Gauge(
            "controlplane_feature_enabled", "1 when the feature is on", ["feature"], registry=r
        )
        self.shed_fraction = Gauge(
            "controlplane_shed_fraction", "Fraction of low-priority requests to shed", registry=r
        )
        self.panic = Gauge("controlplane_panic", "1 when the decision is in panic", registry=r)
        self.frozen = Gauge("controlplane_frozen", "1 when automation is frozen", registry=r)
        self.decision_revision = Gauge(
            "controlplane_decision_revision", "Revision of the decision this agent serves", registry=r
        )
        self.decision_committed = Gauge(
            "controlplane_decision_committed_timestamp_seconds",
            "When the served decision was committed (Unix time)",
            registry=r,
        )
        self.raft_leader = Gauge("controlplane_consensus_is_leader", "1 on the leader", registry=r)
        self.raft_term = Gauge("controlplane_consensus_term", "Consensus term", registry=r)
        self.clock_skew = Gauge(
            "controlplane_clock_skew_seconds",
            "This agent's wall clock against the leader's (leader minus ours); 0 on the leader",
            registry=r,
        )
        self.raft_commit_index = Gauge(
            "controlplane_consensus_commit_index", "Consensus commit index", registry=r
        )
        self.quorum = Gauge(
            "controlplane_consensus_has_quorum", "1 while this agent is in contact with a quorum", registry=r
        )
        self.members_connected = Gauge(
            "controlplane_consensus_members_connected", "Members this agent is connected to", registry=r
        )
        self.decisions_committed = Counter(
            "controlplane_decisions_committed_total", "Decisions this agent committed as leader", registry=r
        )
        self.commit_errors = Counter(
            "controlplane_commit_errors_total", "Failed decision commits by kind", ["kind"], registry=r
        )
        self.failover_duration = Histogram(
            "controlplane_failover_duration_seconds",
            "Time from the first observation of a fault to each stage",
            ["stage"],
            buckets=FAILOVER_BUCKETS,
            registry=r,
        )
        self.watchers = Gauge("controlplane_watchers", "Blocking queries and SSE streams open", registry=r)
        self.api_requests = Counter(
            "controlplane_api_requests_total", "HTTP API requests", ["route", "method", "code"], registry=r
        )
        self.observations_published = Counter(
            "controlplane_observations_published_total", "Observations this agent published", registry=r
        )
        self.failover_budget = Gauge(
            "controlplane_failover_budget_seconds", "Configured failover budget", registry=r
        )

    def observe_probe(
        self, region: str, service: str, ok: bool, duration_s: float, inconclusive: bool = False
    ) -> None:
        self.probe_duration.labels(region, service, self.agent_id).observe(duration_s)
        if inconclusive:
            self.probe_inconclusive.labels(region, service, self.agent_id).inc()
        elif not ok:
            self.probe_failures.labels(region, service, self.agent_id).inc()

    def observe_decision(self, decision: Decision) -> None:
        for service, placements in decision.services.items():
            for region, p in placements.items():
                self.weight.labels(service, region).set(p.weight)
                self.region_state.labels(service, region).set(STATE_CODE[p.state])
                self.verdict.labels(service, region).set(VERDICT_CODE[p.verdict])
        for feature, on in decision.features.items():
            self.feature_enabled.labels(feature).set(1 if on else 0)
        self.shed_fraction.set(decision.shed_fraction)
        self.panic.set(1 if decision.panic else 0)
        self.frozen.set(1 if decision.frozen else 0)
        self.decision_revision.set(decision.revision)
        self.decision_committed.set(decision.committed_at)

    def observe_status(self, status: StoreStatus) -> None:
        self.raft_leader.set(1 if status.is_leader else 0)
        self.raft_term.set(status.term)
        self.raft_commit_index.set(status.commit_index)
        self.quorum.set(1 if status.has_quorum else 0)
        self.members_connected.set(sum(1 for m in status.members if m.connected))
        if status.clock_skew_s is not None:
            self.clock_skew.set(status.clock_skew_s)

    def observe_stages(self, stages: Mapping[str, float]) -> None:
        for stage, seconds in stages.items():
            self.failover_duration.labels(stage).observe(max(0.0, seconds))
