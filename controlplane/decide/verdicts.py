"""From many observers' views to one agreed verdict per (service, region).

A region is taken out only when a quorum of distinct observers with fresh observations
says it is down ("objectively down" in Redis Sentinel's words): one agent with a bad
network path sees the region down alone and changes nothing. Observations older than
`observation_ttl_s` are ignored, so a dead agent's last view expires on its own.

The quorum is `observer_quorum` when configured, otherwise a majority of the configured
agents (`Policy.observers`), so agents that fall silent do not shrink it: with three
agents configured, one fresh observer never takes a region out alone. Policies built by
hand, with no observers listed, use a majority of the live observers instead.

A verdict changes only when a quorum agrees: `DOWN` needs a quorum of down reports,
`UP` (or `SLOW`) a quorum of up reports. With too few witnesses either way the pair is
`UNKNOWN` and the caller keeps the verdict it had.

An observer is **impaired**, and counted neither as a witness nor as live, when it says
so itself (`Observation.impaired`, for example when its probe deadlines fired late
because its own process lagged), or when every fresh observation it has is down and
they cover every region, its own home region included, while another (unimpaired)
observer sees something up. An agent that reaches nothing at all, its own region
included, while others do, is itself the fault; an agent cut off from the other regions
still sees its own region up and remains a witness; and when every observer sees
everything down they agree, their view counts, and the panic rule decides.

An **inconclusive** observation (`Observation.inconclusive`: the observer's probes of
that pair could not tell, say its Prometheus is unreachable) is no witness either way:
it counts neither towards a DOWN nor towards an UP quorum, nor towards finding an
observer impaired. When too few conclusive observations are left the pair is
`UNKNOWN`, the last verdict stands, and the judgement carries how many observers were
inconclusive and why, for the reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import median

from controlplane.model import Observation, Policy, Verdict


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict for one (service, region) and the counts that explain it.

    `slow` counts the up observers above `slow_ms`; `slow_hold` those above the level
    a degraded pair must fall below to be restored (`slow_ms * (1 - degraded_margin)`).
    `configured` is the number of configured agents (0 when the policy lists none).
    """

    verdict: Verdict
    fresh: int = 0
    quorum: int = 0
    down: int = 0
    up: int = 0
    slow: int = 0
    slow_hold: int = 0
    error: str | None = None
    latency_ms: float | None = None
    utilization: float | None = None
    configured: int = 0
    inconclusive: int = 0
    inconclusive_why: str | None = None
    drill: str | None = None  # the drill that takes this pair down, in words

    def quorum_words(self) -> str:
        if self.configured:
            return f"quorum {self.quorum} of {self.configured} configured"
        return f"quorum {self.quorum}"

    def down_sentence(self) -> str:
        if self.drill is not None:
            return f"DRILL, as if it had failed: {self.drill}"
        what = f"report {self.error}" if self.error else "report it down"
        sentence = f"{self.down} of {self.fresh} observers {what}"
        return f"{sentence} ({self.quorum_words()})" if self.configured else sentence

    def not_down_sentence(self) -> str:
        what = f"report {self.error}" if self.error else "report it down"
        return f"{self.down} of {self.fresh} observers {what}, quorum is {self.quorum}: not down"


@dataclass(frozen=True, slots=True)
class Assessment:
    """Every pair's judgement, and the observers left out as impaired (id -> why)."""

    judgements: Mapping[tuple[str, str], Judgement]
    impaired: Mapping[str, str] = field(default_factory=dict)
    live: int = 0


def is_fresh(o: Observation, policy: Policy, now: float) -> bool:
    age = now - o.at
    # A small clock skew into the future is tolerated as much as an age into the past.
    return -policy.observation_ttl_s <= age <= policy.observation_ttl_s


def quorum_for(policy: Policy, fresh: int) -> int:
    """Observers needed to agree: configured, a majority of the configured agents, or
    (when the policy lists no agents) a majority of the live observers.

    An observer is live when any of its observations is fresh, so an agent that has
    not (yet) reported one pair still counts: a lone early reporter is not a quorum.
    """
    if policy.observer_quorum is not None:
        return policy.observer_quorum
    if policy.observers:
        return len(policy.observers) // 2 + 1
    return fresh // 2 + 1


def find_impaired(
    policy: Policy, latest: Mapping[tuple[str, str], Mapping[str, Observation]]
) -> dict[str, str]:
    """Observers whose own view is not evidence, with the reason in words.

    `latest` holds each observer's latest fresh observation per (service, region).
    decide() runs this over every observation, so the common case (nobody flagged,
    everybody sees something up) is one cheap pass.
    """
    saw_up: set[str] = set()
    down_in: dict[str, set[str]] = {}
    flagged = False
    homes = policy.observers
    for (_, region), by_observer in latest.items():
        for observer, o in by_observer.items():
            if o.inconclusive:
                pass  # neither up nor down: no evidence about the observer either
            elif o.up:
                saw_up.add(observer)
            elif observer in homes:
                down_in.setdefault(observer, set()).add(region)
            if o.impaired:
                flagged = True
    out: dict[str, str] = {}
    if flagged:
        # Self-flagged: only an observer's newest word counts (the lag may be over).
        newest: dict[str, float] = {}
        flags: dict[str, set[str]] = {}
        for by_observer in latest.values():
            for observer, o in by_observer.items():
                at = newest.get(observer)
                if at is None or o.at > at:
                    newest[observer] = at = o.at
                    flags.pop(observer, None)
                if o.impaired and o.at == at:
                    flags.setdefault(observer, set()).add(o.impaired)
        out = {observer: "; ".join(sorted(why)) for observer, why in flags.items()}
    regions = len(policy.regions)
    others_see_up = bool(saw_up - out.keys())
    for observer, seen in down_in.items():
        # Every region down, so its own home region too (homes are configured regions),
        # while an unimpaired observer sees something up. When they all see everything
        # down the view is unanimous: then it is evidence, and the panic rule decides.
        if observer not in out and observer not in saw_up and len(seen) >= regions and others_see_up:
            out[observer] = "reports every pair down, its own region included"
    return out


def assess(policy: Policy, observations: Iterable[Observation], now: float) -> Assessment:
    """Verdicts keyed by (service, region) for every configured pair, and who was left out.

    A pair with no fresh observation from a counted observer, or without a quorum
    either way, is `UNKNOWN`; the caller decides what that means.
    """
    ttl = policy.observation_ttl_s
    latest: dict[tuple[str, str], dict[str, Observation]] = {}
    observers: set[str] = set()
    for o in observations:
        # is_fresh(), inlined: this loop sees every observation of every agent.
        if not -ttl <= now - o.at <= ttl:
            continue
        by_observer = latest.setdefault((o.service, o.region), {})
        seen = by_observer.get(o.observer)
        if seen is None:
            by_observer[o.observer] = o
            observers.add(o.observer)
        elif seen.at < o.at:
            by_observer[o.observer] = o

    impaired = find_impaired(policy, latest)
    live = len(observers) - len(impaired)
    quorum = quorum_for(policy, live)
    out: dict[tuple[str, str], Judgement] = {}
    for service in policy.services:
        for region in policy.regions_of(service):
            by_observer = latest.get((service, region.name), {})
            if impaired:
                counted = [o for name, o in by_observer.items() if name not in impaired]
            else:
                counted = list(by_observer.values())
            out[(service, region.name)] = _judge_one(policy, counted, live, quorum)
    return Assessment(judgements=out, impaired=dict(sorted(impaired.items())), live=live)


def judge(
    policy: Policy, observations: Iterable[Observation], now: float
) -> Mapping[tuple[str, str], Judgement]:
    """Verdicts keyed by (service, region) for every configured pair (see `assess`)."""
    return assess(policy, observations, now).judgements


def _judge_one(policy: Policy, views: list[Observation], live: int, quorum: int) -> Judgement:
    if not views:
        return Judgement(Verdict.UNKNOWN, quorum=quorum, configured=len(policy.observers))
    unsure = Counter(v.inconclusive for v in views if v.inconclusive)
    # Most common words, ties broken by text, so every agent writes the same sentence.
    unsure_why = min(unsure, key=lambda e: (-unsure[e], e)) if unsure else None
    if unsure:
        views = [v for v in views if not v.inconclusive]
    down = [v for v in views if not v.up]
    up = [v for v in views if v.up]
    errors = Counter(v.error for v in down if v.error)
    # Most common error, ties broken by name so the sentence is the same on every run.
    error = min(errors, key=lambda e: (-errors[e], e)) if errors else None
    latencies = [v.latency_ms for v in up if v.latency_ms is not None]
    utilizations = [v.utilization for v in up if v.utilization is not None]
    hold_ms = policy.slow_ms * (1.0 - policy.degraded_margin)
    slow = sum(1 for lat in latencies if lat > policy.slow_ms)
    slow_hold = sum(1 for lat in latencies if lat > hold_ms)
    latency = median(latencies) if latencies else None
    utilization = median(utilizations) if utilizations else None
    if len(down) >= quorum:
        verdict = Verdict.DOWN
    elif len(up) < quorum:
        verdict = Verdict.UNKNOWN
    elif slow >= quorum or (utilization is not None and utilization > policy.utilization_high):
        verdict = Verdict.SLOW
    else:
        verdict = Verdict.UP
    return Judgement(
        verdict=verdict,
        fresh=live,
        quorum=quorum,
        down=len(down),
        up=len(up),
        slow=slow,
        slow_hold=slow_hold,
        error=error,
        latency_ms=latency,
        utilization=utilization,
        configured=len(policy.observers),
        inconclusive=sum(unsure.values()),
        inconclusive_why=unsure_why,
    )


def still_degraded(policy: Policy, j: Judgement) -> bool:
    """A degraded pair stays degraded until it is clearly better (hysteresis).

    It entered above `slow_ms` (or `utilization_high`) by a quorum; it leaves only once
    fewer than a quorum see latency above `slow_ms * (1 - degraded_margin)` and the
    median utilization is below `utilization_high * (1 - degraded_margin)`. A signal
    that hovers at the threshold therefore changes nothing.
    """
    if j.verdict not in (Verdict.UP, Verdict.SLOW):
        return False
    hot = j.utilization is not None and j.utilization > policy.utilization_high * (
        1.0 - policy.degraded_margin
    )
    return j.slow_hold >= j.quorum or hot
