"""Shares of one service's traffic across its regions, and integer weights from them.

Each serving region keeps its base share scaled by its multiplier (ramp, degraded
factor). What the others lose (down, drained, held, scaled down) is handed out in
proportion to base shares, first to regions serving at full strength, then to the
partially serving ones, never past a region's capacity cap. Whatever no cap can absorb
(the survivors are overloaded: the degradation ladder sheds the difference) is spread in
proportion to capacity so the weights still sum to 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Slot:
    """One region's inputs to the split. `cap` is the largest share it may carry."""

    region: str
    base: float  # normalized base share, sums to 1 over the service's regions
    multiplier: float  # 0 when not serving; ramp x degraded factor otherwise
    cap: float  # math.inf when demand is unknown or caps do not apply


def fill(
    amount: float,
    shares: dict[str, float],
    recipients: Sequence[str],
    key: Mapping[str, float],
    caps: Mapping[str, float],
) -> float:
    """Give `amount` to `recipients` in proportion to `key`, within `caps`.

    Mutates `shares`; returns what could not be placed. Water-filling: a recipient
    that hits its cap drops out and the rest is shared among the others.
    """
    open_ = [r for r in recipients if caps[r] - shares[r] > EPS and key[r] > 0]
    while amount > EPS and open_:
        total = sum(key[r] for r in open_)
        given = 0.0
        still_open = []
        for r in open_:
            offer = amount * key[r] / total
            room = caps[r] - shares[r]
            take = min(offer, room)
            shares[r] += take
            given += take
            if room - take > EPS:
                still_open.append(r)
        amount -= given
        if len(still_open) == len(open_):
            break
        open_ = still_open
    return max(amount, 0.0)


def split(slots: Sequence[Slot], preferred: Mapping[str, float] | None = None) -> dict[str, float]:
    """Fractions of the service's traffic per region (sum 1 when any region serves).

    `preferred` maps a recipient region to an amount of lost share it takes first
    (a failover intent sends the failed region's share to its chosen target).
    """
    serving = [s.region for s in slots if s.multiplier > 0]
    shares = {s.region: 0.0 for s in slots}
    if not serving:
        return shares
    by = {s.region: s for s in slots}
    caps = {s.region: (s.cap if s.multiplier > 0 else 0.0) for s in slots}
    base = {s.region: s.base for s in slots}
    for r in serving:
        shares[r] = min(by[r].base * by[r].multiplier, caps[r])
    lost = 1.0 - sum(shares.values())
    for region, amount in (preferred or {}).items():
        if region in shares and by[region].multiplier > 0:
            want = min(amount, lost)
            lost -= want - fill(want, shares, [region], {region: 1.0}, caps)
    full = [r for r in serving if by[r].multiplier >= 1.0]
    partial = [r for r in serving if by[r].multiplier < 1.0]
    lost = fill(lost, shares, full, base, caps)
    lost = fill(lost, shares, partial, base, caps)
    if lost > EPS:
        # Over capacity everywhere: spread the rest by capacity (or base share).
        weight_key = {
            r: (caps[r] if math.isfinite(caps[r]) and caps[r] > 0 else max(base[r], EPS)) for r in serving
        }
        unlimited = dict.fromkeys(serving, math.inf)
        fill(lost, shares, serving, weight_key, unlimited)
    return shares


def to_weights(shares: Mapping[str, float], caps: Mapping[str, float], total: int = 100) -> dict[str, int]:
    """Integer weights summing to `total` (largest remainder), when any share is > 0.

    Leftover points go first to regions that stay within their cap, then by the
    largest remainder, ties broken by the order of `shares` so the result is stable.
    """
    if sum(shares.values()) <= EPS:
        return dict.fromkeys(shares, 0)
    exact = {r: s * total for r, s in shares.items()}
    weights = {r: math.floor(x + EPS) for r, x in exact.items()}
    order = list(shares)
    left = total - sum(weights.values())
    candidates = [r for r in order if shares[r] > EPS]

    def rank(r: str) -> tuple[bool, float, int]:
        fits = weights[r] + 1 <= caps.get(r, math.inf) * total + EPS
        return (not fits, -(exact[r] - weights[r]), order.index(r))

    while left > 0:
        for r in sorted(candidates, key=rank)[:left]:
            weights[r] += 1
            left -= 1
    while left < 0:  # only from float noise; take from the largest
        r = max(candidates, key=lambda r: (weights[r], -order.index(r)))
        weights[r] -= 1
        left += 1
    return weights
