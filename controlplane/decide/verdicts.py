"""From many observers' views to one agreed verdict per (service, region).

A region is taken out only when a quorum of distinct observers with fresh observations
says it is down ("objectively down" in Redis Sentinel's words): one agent with a bad
network path sees the region down alone and changes nothing. Observations older than
`observation_ttl_s` are ignored, so a dead agent's last view expires on its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median

from controlplane.model import Observation, Policy, Verdict


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict for one (service, region) and the counts that explain it."""

    verdict: Verdict
    fresh: int = 0
    quorum: int = 0
    down: int = 0
    slow: int = 0
    error: str | None = None
    latency_ms: float | None = None
    utilization: float | None = None

    def down_sentence(self) -> str:
        what = f"report {self.error}" if self.error else "report it down"
        return f"{self.down} of {self.fresh} observers {what}"


def is_fresh(o: Observation, policy: Policy, now: float) -> bool:
    age = now - o.at
    # A small clock skew into the future is tolerated as much as an age into the past.
    return -policy.observation_ttl_s <= age <= policy.observation_ttl_s


def quorum_for(policy: Policy, fresh: int) -> int:
    """Observers needed to agree: configured, or a majority of the live observers.

    An observer is live when any of its observations is fresh, so an agent that has
    not (yet) reported one pair still counts: a lone early reporter is not a quorum.
    """
    if policy.observer_quorum is not None:
        return policy.observer_quorum
    return fresh // 2 + 1


def judge(
    policy: Policy, observations: Iterable[Observation], now: float
) -> dict[tuple[str, str], Judgement]:
    """Verdicts keyed by (service, region) for every configured pair.

    A pair with no fresh observation is `UNKNOWN`; the caller decides what that means.
    """
    latest: dict[tuple[str, str], dict[str, Observation]] = {}
    for o in observations:
        if not is_fresh(o, policy, now):
            continue
        by_observer = latest.setdefault((o.service, o.region), {})
        seen = by_observer.get(o.observer)
        if seen is None or seen.at < o.at:
            by_observer[o.observer] = o

    live = len({observer for views in latest.values() for observer in views})
    out: dict[tuple[str, str], Judgement] = {}
    for service in policy.services:
        for region in policy.regions_of(service):
            views = list(latest.get((service, region.name), {}).values())
            out[(service, region.name)] = _judge_one(policy, views, live)
    return out


def _judge_one(policy: Policy, views: list[Observation], live: int) -> Judgement:
    if not views:
        return Judgement(Verdict.UNKNOWN)
    fresh = live
    quorum = quorum_for(policy, live)
    down = [v for v in views if not v.up]
    up = [v for v in views if v.up]
    errors = Counter(v.error for v in down if v.error)
    # Most common error, ties broken by name so the sentence is the same on every run.
    error = min(errors, key=lambda e: (-errors[e], e)) if errors else None
    latencies = [v.latency_ms for v in up if v.latency_ms is not None]
    utilizations = [v.utilization for v in up if v.utilization is not None]
    slow = sum(1 for lat in latencies if lat > policy.slow_ms)
    latency = median(latencies) if latencies else None
    utilization = median(utilizations) if utilizations else None
    if len(down) >= quorum:
        verdict = Verdict.DOWN
    elif slow >= quorum or (utilization is not None and utilization > policy.utilization_high):
        verdict = Verdict.SLOW
    else:
        verdict = Verdict.UP
    return Judgement(
        verdict=verdict,
        fresh=fresh,
        quorum=quorum,
        down=len(down),
        slow=slow,
        error=error,
        latency_ms=latency,
        utilization=utilization,
    )
