"""Rise/fall counting per target, and the rule that turns targets into one observation.

Pure and synchronous, so the rules below are tested without a network or a clock.

Per target (HAProxy's `rise`/`fall`): a target starts *unknown*. It becomes up after
`rise` consecutive successes and down after `fall` consecutive failures; once up it
needs `fall` consecutive failures to go down, once down `rise` consecutive successes to
come back. Any result of the other kind resets the streak. HAProxy starts servers as up
instead; we start unknown because an agent that just started has no evidence either way,
and an observation it cannot back would count towards a quorum. So an agent publishes
nothing for a (region, service) until it knows, which takes `rise` or `fall` probes.

Slow and hot get the same counting, without the prober having to know the thresholds
(`slow_ms` and `utilization_high` are the decision's business): the latency a target
reports is filtered so that, for *every* threshold at once, it is above the threshold
only after `fall` consecutive successful probes above it, and below again only after
`rise` consecutive ones below it. The filter is one line: with `low` the lowest of the
last `fall` latencies and `high` the highest of the last `rise`, the reported latency
becomes `max(low, min(previous, high))` (the first reported one is the first measured).
A latency alternating 990/1010 ms around a 1000 ms threshold therefore never reads as
slow, and a steady 1500 ms does after `fall` probes. Utilization is filtered the same
way; a successful probe without a utilization clears it. Failed probes are neither fast
nor slow.

Per (region, service), with several targets (for example one per load balancer VIP):
the service is **up when at least one target is up** (as an HAProxy backend is up while
any server is, and as a Kubernetes service is while it has a ready endpoint); **down when
no target is up and at least one is down**; unknown (no observation) while every target
is unknown. An up observation reports the *worst* latency and utilization among the up
targets: load balancers spread traffic over all of them, so one slow or hot target is
what a share of the users feel (gray failure). A down observation carries the error of
the first down target in configured order and no latency. Either way `at` is the time of
the latest probe of any of its targets, so an observation ages when probing stalls.

Inconclusive probes (a Prometheus that does not answer, or answers nothing) are not
failures: they touch neither the streaks nor the filtered values, so rise/fall resumes
where it was when answers come back. A target whose last `fall` probes were all
inconclusive is itself inconclusive, and is left out of the rule above, which the
targets that can tell decide alone. When no target can tell (every one is unknown or
inconclusive, at least one inconclusive), the observation says so in `inconclusive`,
with `up` the last conclusive state: `decide()` does not count it either way. A target
that never had a conclusive probe publishes nothing else than that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from controlplane.model import Observation
from controlplane.probes.target import ProbeResult, ProbeTarget


@dataclass(slots=True)
class TargetHealth:
    """The rise/fall state of one target. Mutable; one prober owns it.

    `latency_ms` and `utilization` are the filtered values (see the module docstring),
    not the last probe's: they cross a threshold only after rise/fall counting.
    """

    rise: int
    fall: int
    up: bool | None = None
    successes: int = 0
    failures: int = 0
    latency_ms: float | None = None
    utilization: float | None = None
    error: str | None = None
    at: float | None = None
    # Consecutive inconclusive probes (capped at `fall`) and the last one's words.
    unsure: int = 0
    unsure_why: str | None = None
    _latencies: deque[float] = field(default_factory=deque, repr=False)
    _utilizations: deque[float] = field(default_factory=deque, repr=False)

    @classmethod
    def of(cls, target: ProbeTarget) -> TargetHealth:
        return cls(rise=target.rise, fall=target.fall)

    def record(self, result: ProbeResult, at: float) -> None:
        """Count one probe result taken at wall time `at`."""
        self.at = at
        if result.inconclusive:
            self.unsure = min(self.unsure + 1, self.fall)
            self.unsure_why = result.error or "inconclusive"
            return
        self.unsure = 0
        self.unsure_why = None
        if result.ok:
            # Streaks are capped at their threshold: only reaching it matters.
            self.successes = min(self.successes + 1, self.rise)
            self.failures = 0
            latency = result.latency_ms
            if latency is None:
                self._latencies.clear()
                self.latency_ms = None
            else:
                self.latency_ms = self._counted(self._latencies, self.latency_ms, latency)
            if result.utilization is None:
                self._utilizations.clear()
                self.utilization = None
            else:
                self.utilization = self._counted(self._utilizations, self.utilization, result.utilization)
            if self.successes >= self.rise:
                self.up = True
        else:
            self.failures = min(self.failures + 1, self.fall)
            self.successes = 0
            self.error = result.error
            if self.failures >= self.fall:
                self.up = False

    @property
    def inconclusive(self) -> bool:
        """The last `fall` probes could not tell (a Prometheus gone, an empty answer)."""
        return self.unsure >= self.fall

    def _counted(self, recent: deque[float], previous: float | None, value: float) -> float:
        """The filtered value after `value`: rise/fall counting at every threshold at once.

        Above a threshold now iff the last `fall` values are all above it, or it was
        above before and not all of the last `rise` values are below it (or at it).
        """
        recent.append(value)
        while len(recent) > max(self.rise, self.fall):
            recent.popleft()
        low = min(list(recent)[-self.fall :])
        if previous is None:
            return low
        high = max(list(recent)[-self.rise :])
        return max(low, min(previous, high))


def summarize(
    observer: str, region: str, service: str, targets: Sequence[TargetHealth]
) -> Observation | None:
    """One observation for (region, service) from its targets; None while unknown."""
    seen = [t.at for t in targets if t.at is not None]
    if not seen:
        return None
    at = max(seen)
    sure = [t for t in targets if not t.inconclusive]
    up = [t for t in sure if t.up is True]
    if up:
        return Observation(
            observer=observer,
            region=region,
            service=service,
            up=True,
            at=at,
            latency_ms=_worst(t.latency_ms for t in up),
            utilization=_worst(t.utilization for t in up),
        )
    for t in sure:
        if t.up is False:
            return Observation(
                observer=observer, region=region, service=service, up=False, at=at, error=t.error
            )
    unsure = [t for t in targets if t.inconclusive]
    if unsure:
        # Nothing conclusive to say: the last conclusive state, marked as not evidence.
        last_up = any(t.up is True for t in unsure) or all(t.up is None for t in unsure)
        error = None if last_up else next((t.error for t in unsure if t.up is False), None)
        return Observation(
            observer=observer,
            region=region,
            service=service,
            up=last_up,
            at=at,
            error=error,
            inconclusive=unsure[0].unsure_why,
        )
    return None


def is_slow(observation: Observation | None, slow_ms: float | None) -> bool:
    """Up but answering slower than `slow_ms` (never, when no threshold is set)."""
    return (
        slow_ms is not None
        and observation is not None
        and observation.up
        and observation.inconclusive is None
        and observation.latency_ms is not None
        and observation.latency_ms > slow_ms
    )


def _worst(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
