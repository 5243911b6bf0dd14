"""Panic: what to serve when the verdicts would leave (almost) nothing serving.

When fewer than `panic_below` regions (default 1: none) would serve a service, the
probes are more likely wrong than every region at once (Envoy's panic threshold reasons
the same way), so the service is not black-holed. But a panic must not undo what the
quorum already established before the fault that caused it: a region that was
correctly taken out a minute ago is still dead.

The panic set is fixed when the panic begins and kept (in `Decision.panic_regions`)
until it ends:

- the regions the last decision before the panic served (weight above 0), and
- the regions taken out by the same correlated fault: those whose DOWN verdict began
  within `panic_correlation_s` of the decision that enters panic.

Why a time window: one fault (an observer's prober stalling, a shared dependency, a
network partition) is detected on every (region, service) within about one probe
interval plus one probe timeout of the others, because each target's `fall`-th failed
probe runs at its own phase within the interval and a timeout takes up to `timeout_s`
longer than a refusal. So `config.py` derives the default window as the largest
`interval_s + timeout_s` of any target (1.8 s with the default probes). Regions that
fail a few hundred milliseconds apart therefore all come back; a region whose DOWN
verdict is older than that was lost to a fault of its own and never gets traffic from
a panic. Too wide a window would re-admit a dead region; too narrow one would leave out
a region of the same fault, whose share the others carry: the narrow error is the safe
one.

Operators' intents still apply in panic: a drain or failover takes its region out of
the panic set (never below `min_healthy_regions` serving, like any drain) and an
undrain puts it back. Regions that serve by their own verdict always serve. A region
that served through the panic skips the recovery hold and ramp when its verdict comes
back (see `decide._track`): it was carrying traffic all along.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.decide.pairs import Build, Pair, ts
from controlplane.model import Decision, Placement, Policy, State, Verdict


def panic_set(
    policy: Policy,
    service: str,
    pairs: Mapping[str, Pair],
    previous: Decision | None,
    now: float,
) -> tuple[tuple[str, ...], float]:
    """The regions this panic may serve, and when it began.

    Kept from the previous decision while the panic lasts; chosen when it begins.
    """
    prev_s: Mapping[str, Placement] = previous.services.get(service, {}) if previous is not None else {}
    if previous is not None and service in previous.panic_services:
        since = previous.panic_since.get(service, previous.decided_at)
        kept = previous.panic_regions.get(service)
        if kept is None:
            # Decided by a release that did not record the set: what it served.
            kept = tuple(r for r, p in prev_s.items() if p.weight > 0)
        return tuple(r for r in pairs if r in kept), since
    window_start = now - policy.panic_correlation_s
    members = []
    for region, pair in pairs.items():
        served = region in prev_s and prev_s[region].weight > 0
        same_fault = pair.verdict == Verdict.DOWN and pair.verdict_since >= window_start
        if served or same_fault:
            members.append(region)
    if not members:
        # Nothing served and nothing just failed (a state only an older release leaves):
        # the regions whose probes say up but that wait out their recovery hold.
        members = [r for r, p in pairs.items() if p.verdict != Verdict.DOWN]
    return tuple(members), now


def explain(
    policy: Policy,
    service: str,
    pairs: Mapping[str, Pair],
    members: tuple[str, ...],
    alive: int,
) -> list[str]:
    """Reasons for a panic: why, what it serves, and who stays out and why."""
    serving = []
    for region, pair in pairs.items():
        if pair.serving:
            serving.append(region)
    what = ", ".join(serving) if serving else "nothing"
    out = [
        f"panic: verdicts would leave {alive} of {len(pairs)} regions serving {service} "
        f"(panic_below={policy.panic_below}); serving {what} as if healthy "
        f"(the regions serving before it and those the same fault took down within "
        f"{policy.panic_correlation_s:g} s)"
    ]
    out.extend(
        f"{region}/{service} stays out of the panic: down since {ts(pair.verdict_since)}, "
        f"before the fault that caused it"
        for region, pair in pairs.items()
        if region not in members and pair.verdict == Verdict.DOWN
    )
    return out


def back_from_drain(
    service: str, pairs: Mapping[str, Pair], prev_s: Mapping[str, Placement], b: Build
) -> None:
    """Say which panic members an undrain put back."""
    for region, pair in pairs.items():
        prev = prev_s.get(region)
        if pair.panic_member and pair.serving and prev is not None and prev.state == State.DRAINED:
            b.reasons.append(f"{region}/{service} back in the panic: no longer drained")
