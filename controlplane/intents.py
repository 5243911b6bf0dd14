"""How a committed operator command changes the set of standing intents.

Both consensus backends apply commands through `apply_intent` so they agree byte for
byte: a pure function of (standing intents, command). Drains, failovers, overrides,
feature switches and freezes stand until cleared; `undrain` and `unfreeze` clear the
matching standing intents and do not stand themselves. A newer intent on the same
target replaces the older one (a second override of `order` replaces the first).
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.errors import NotFound, Rejected
from controlplane.model import Intent, IntentKind


def _same_target(a: Intent, b: Intent) -> bool:
    if a.kind != b.kind:
        return False
    match a.kind:
        case IntentKind.DRAIN:
            return a.region == b.region and a.service == b.service
        case IntentKind.FAILOVER:
            return a.from_region == b.from_region and a.service == b.service
        case IntentKind.OVERRIDE:
            return a.service == b.service
        case IntentKind.FEATURE:
            return a.feature == b.feature
        case IntentKind.FREEZE | IntentKind.DRILL:
            return True  # one at a time
        case _:
            return False


def apply_intent(standing: Mapping[str, Intent], intent: Intent) -> dict[str, Intent]:
    """The standing intents after `intent` is committed.

    Raises `Rejected` (and changes nothing) when an undrain or unfreeze has nothing
    to clear, or when an undrain of one service meets a drain of the whole region.
    """
    out = dict(standing)
    if intent.kind == IntentKind.UNDRAIN:
        whole_region = [
            i
            for i in out.values()
            if i.kind == IntentKind.DRAIN and i.region == intent.region and i.service is None
        ]
        if intent.service is not None and whole_region:
            raise Rejected(
                f"{intent.region} is drained for every service",
                f"undrain {intent.region} without a service, or drain the other services one by one",
            )
        cleared = [
            i.id
            for i in out.values()
            if i.kind == IntentKind.DRAIN
            and i.region == intent.region
            and (intent.service is None or i.service == intent.service)
        ]
        if not cleared:
            scope = f"/{intent.service}" if intent.service else ""
            raise Rejected(f"{intent.region}{scope} is not drained", "nothing to undrain")
        for intent_id in cleared:
            del out[intent_id]
        return out
    if intent.kind == IntentKind.UNFREEZE:
        cleared = [i.id for i in out.values() if i.kind == IntentKind.FREEZE]
        if not cleared:
            raise Rejected("automation is not frozen", "nothing to unfreeze")
        for intent_id in cleared:
            del out[intent_id]
        return out
    for older in [i.id for i in out.values() if _same_target(i, intent)]:
        del out[older]
    out[intent.id] = intent
    return out


def remove_intent(standing: Mapping[str, Intent], intent_id: str) -> dict[str, Intent]:
    """The standing intents without `intent_id`; `NotFound` when it does not stand."""
    if intent_id not in standing:
        raise NotFound(f"no standing intent {intent_id}", "see GET /v1/intents for the standing ones")
    out = dict(standing)
    del out[intent_id]
    return out


def ordered(standing: Mapping[str, Intent]) -> list[Intent]:
    """Standing intents oldest first (by commit order)."""
    return sorted(standing.values(), key=lambda i: (i.seq, i.id))


def expired(standing: Mapping[str, Intent], now: float) -> list[Intent]:
    """Standing intents whose `expires_at` has passed at `now` (cluster time), oldest first."""
    return [i for i in ordered(standing) if i.expired(now)]


def active(standing: Mapping[str, Intent], now: float) -> dict[str, Intent]:
    """The standing intents that have not expired at `now`."""
    return {k: i for k, i in standing.items() if not i.expired(now)}
