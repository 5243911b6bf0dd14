"""Working state of one (service, region) while a decision is built, and its reasons."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from controlplane.model import Intent, Policy, State, Verdict


@dataclass(slots=True)
class Pair:
    """One (service, region) on its way into the decision."""

    region: str
    verdict: Verdict
    verdict_since: float
    serving_since: float | None
    ramp: float
    held_until: float | None = None
    drained_by: Intent | None = None
    failover_to: str | None = None
    # In a panic: one of the regions the panic serves (before drains).
    panic_member: bool = False

    @property
    def by_verdict(self) -> bool:
        """Serving as far as observers and the recovery hold are concerned."""
        return self.verdict != Verdict.DOWN and self.held_until is None

    @property
    def serving(self) -> bool:
        return (self.by_verdict or self.panic_member) and self.drained_by is None

    def multiplier(self, policy: Policy, in_panic: bool = False) -> float:
        if not self.serving:
            return 0.0
        if in_panic:
            return 1.0  # as if healthy: the whole base share, no ramp, no degraded factor
        factor = policy.degraded_factor if self.verdict == Verdict.SLOW else 1.0
        return self.ramp * factor

    def state(self) -> State:
        if self.drained_by is not None:
            return State.DRAINED
        if not (self.by_verdict or self.panic_member):
            return State.DOWN
        return State.DEGRADED if self.verdict == Verdict.SLOW else State.HEALTHY


@dataclass(slots=True)
class Build:
    """What the rules say while they run: reasons, and when time alone changes things."""

    reasons: list[str] = field(default_factory=list)
    review_at: list[float] = field(default_factory=list)


def pct(x: float) -> str:
    return f"{round(x * 100)}%"


def ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%SZ")
