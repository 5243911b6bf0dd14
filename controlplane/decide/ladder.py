"""The degradation ladder: which features go off, and how much traffic to shed.

When the capacity that still serves a service is below its expected demand, features
are switched off, least critical first (highest `level`; level 1 is never touched),
until the load they save covers the deficit of every service; if switching off every
eligible feature is not enough, a shed fraction for low-priority requests covers the
rest. This happens in the same decision as the fault, never after a ramp.

Restoring is slower than degrading (hysteresis): a feature comes back only when the
capacity would cover demand with it on plus `restore_margin`, so a region that hovers
at the edge does not toggle features on every probe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlplane.model import FeatureSpec, Policy

MAX_SAVED = 0.95  # features never claim to remove (almost) all demand


@dataclass(frozen=True, slots=True)
class Degradation:
    off: tuple[str, ...]  # automatically switched off, in ladder order
    shed_fraction: float
    short: Mapping[str, tuple[float, float]]  # service -> (demand_rps, capacity_rps) when short

    def saved(self, policy: Policy, service: str, forced_off: Sequence[str] = ()) -> float:
        return saved_fraction(policy.features, service, (*forced_off, *self.off))


def saved_fraction(features: Sequence[FeatureSpec], service: str, off: Sequence[str]) -> float:
    names = set(off)
    saved = sum(f.saves for f in features if f.name in names and f.applies_to(service))
    return min(saved, MAX_SAVED)


def ladder_of(policy: Policy, forced: Mapping[str, bool]) -> list[FeatureSpec]:
    """Features automation may switch off, in the order it switches them off."""
    eligible = [f for f in policy.features if f.level >= 2 and f.name not in forced]
    return sorted(eligible, key=lambda f: (-f.level, f.name))


def degrade(
    policy: Policy,
    capacity_rps: Mapping[str, float],
    forced: Mapping[str, bool],
    previous_features: Mapping[str, bool],
) -> Degradation:
    """Decide features off and shed fraction.

    `capacity_rps` is the serving capacity per service (only services whose demand is
    known and that take part); `forced` holds operator feature intents (name -> enabled);
    `previous_features` is the previous decision's features map (name -> enabled).
    """
    ladder = ladder_of(policy, forced)
    forced_off = [name for name, enabled in forced.items() if not enabled]
    demand = {s: d for s, d in policy.demand_rps.items() if s in capacity_rps}

    def need(service: str, k: int) -> float:
        off = [*forced_off, *(f.name for f in ladder[:k])]
        return demand[service] * (1.0 - saved_fraction(policy.features, service, off))

    def covered(k: int, margin: float) -> bool:
        return all(need(s, k) * (1.0 + margin) <= capacity_rps[s] + 1e-9 for s in demand)

    def first_covered(margin: float) -> int:
        return next((k for k in range(len(ladder) + 1) if covered(k, margin)), len(ladder))

    k_strict = first_covered(0.0)
    k_prev = 0
    for f in ladder:
        if previous_features.get(f.name, True):
            break
        k_prev += 1
    k_restore = first_covered(policy.restore_margin)
    k = max(k_strict, min(k_prev, k_restore))

    shed = 0.0
    if not covered(k, 0.0):
        worst = max(1.0 - capacity_rps[s] / need(s, k) for s in demand if need(s, k) > 0)
        shed = min(1.0, math.ceil(worst * 100 - 1e-9) / 100)
    short = {s: (need(s, 0), capacity_rps[s]) for s in demand if need(s, 0) > capacity_rps[s] + 1e-9}
    return Degradation(off=tuple(f.name for f in ladder[:k]), shed_fraction=shed, short=short)
