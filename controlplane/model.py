"""The words of the product as immutable values.

Everything the decision engine reads or writes is defined here: what an observer saw
(`Observation`), what an operator asked for (`Intent`), what the cluster agreed
(`Decision`) and the static `Policy` the decision is made under. These are plain frozen
dataclasses with no behaviour that touches the outside world, so the pure core, both
consensus backends and the HTTP API can share them and tests can build them by hand.

Times are Unix seconds (floats) passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any


def _restore(cls: type[Any], state: Mapping[str, Any]) -> Any:
    """Rebuild a record from its pickled field map, tolerating added and removed fields."""
    obj = object.__new__(cls)
    for f in fields(cls):
        if f.name in state:
            value = state[f.name]
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"cannot restore {cls.__name__}: field {f.name!r} missing and has no default")
        object.__setattr__(obj, f.name, value)
    return obj


class Record:
    """Pickles by field name, so journals survive a release that adds or drops a field.

    The Raft journal and snapshots pickle these values. A frozen slots dataclass pickles
    its fields as a positional list by default: a field added in the middle would shift
    every value after it, silently. By name, an added field takes its default and a
    removed one is ignored.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), {f.name: getattr(self, f.name) for f in fields(self)}))  # type: ignore[arg-type]


class State(enum.StrEnum):
    """What a load balancer should do with a (service, region)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    DRAINED = "drained"


class Verdict(enum.StrEnum):
    """What the quorum of observers agrees about a (service, region)."""

    UP = "up"
    SLOW = "slow"
    DOWN = "down"
    UNKNOWN = "unknown"


class IntentKind(enum.StrEnum):
    DRAIN = "drain"
    UNDRAIN = "undrain"
    FAILOVER = "failover"
    OVERRIDE = "override"
    FEATURE = "feature"
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    DRILL = "drill"


# Kinds that stand until cleared; undrain and unfreeze only clear standing ones.
STANDING_KINDS = frozenset(
    {
        IntentKind.DRAIN,
        IntentKind.FAILOVER,
        IntentKind.OVERRIDE,
        IntentKind.FEATURE,
        IntentKind.FREEZE,
        IntentKind.DRILL,
    }
)


@dataclass(frozen=True, slots=True)
class Observation(Record):
    """One observer's local view of one (region, service) at time `at`.

    `up` already went through the probe's rise/fall counting. `latency_ms` is the last
    successful probe's latency, `utilization` what the target reported (0..1), `error`
    the last failure in words ("connect timeout", "HTTP 503"). `impaired` is set by an
    observer that knows its own view is unreliable, in words ("probe deadlines fired
    850 ms late"): `decide()` then does not count it as a witness. `inconclusive` is
    set when this observer's probes of this pair could not tell either way, in words
    ("prometheus unreachable: inconclusive"): `up` is then its last conclusive state
    (True when it never had one), and `decide()` counts the observation as neither up
    nor down, never as a witness, and says so in the reasons.
    """

    observer: str
    region: str
    service: str
    up: bool
    at: float
    latency_ms: float | None = None
    utilization: float | None = None
    error: str | None = None
    impaired: str | None = None
    inconclusive: str | None = None


@dataclass(frozen=True, slots=True)
class Intent(Record):
    """An operator's instruction, committed through consensus with who and why.

    Only the fields of its kind are set: `region`/`service` for drain, undrain and
    drill (service None means every service), `from_region`/`to_region`/`service` for
    failover, `service`/`weights` for override, `feature`/`enabled` for feature.
    `seq` is assigned by the store when the intent is committed and orders intents.
    `expires_at` (cluster time), when set, is when the intent stops by itself: the leader
    removes it then, as if an operator had (`who` "expiry"), so a drain or a drill with
    an end comes back even if the operator, their terminal and cpctl are gone.
    """

    id: str
    kind: IntentKind
    reason: str
    who: str = "unknown"
    created_at: float = 0.0
    seq: int = 0
    region: str | None = None
    service: str | None = None
    from_region: str | None = None
    to_region: str | None = None
    weights: Mapping[str, int] | None = None
    feature: str | None = None
    enabled: bool | None = None
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def describe(self) -> str:
        """A short human sentence, used in reasons and history."""
        scope = f"/{self.service}" if self.service else ""
        match self.kind:
            case IntentKind.DRAIN | IntentKind.UNDRAIN | IntentKind.DRILL:
                what = f"{self.kind} {self.region}{scope}"
            case IntentKind.FAILOVER:
                what = f"failover {self.from_region} -> {self.to_region}{scope or ' (all services)'}"
            case IntentKind.OVERRIDE:
                pairs = ", ".join(f"{r}={w}" for r, w in sorted((self.weights or {}).items()))
                what = f"override {self.service} weights {pairs}"
            case IntentKind.FEATURE:
                what = f"feature {self.feature} {'on' if self.enabled else 'off'}"
            case _:
                what = str(self.kind)
        until = ""
        if self.expires_at is not None:
            until = f" until {iso_time(self.expires_at)}"
        return f"{what}{until} by {self.who} ({self.reason})"


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """A region as the policy sees it: per-service capacity and base weight."""

    name: str
    capacity_rps: Mapping[str, float]
    base_weight: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """A feature that can be switched off to save load.

    `level` 1 is critical and never switched off by automation; higher levels are
    less critical and go first. `saves` is the fraction of the demand of `services`
    (every service when empty) that disappears when the feature is off.
    """

    name: str
    level: int
    saves: float
    services: tuple[str, ...] = ()

    def applies_to(self, service: str) -> bool:
        return not self.services or service in self.services


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything `decide()` needs besides observations, intents and the clock.

    `observers` maps each configured agent id to its home region (from
    `cluster.agents`); when it is empty (policies built by hand) the quorum is a
    majority of the live observers and no observer can be found impaired by its view.
    `panic_below`: panic starts when fewer regions than this would serve a service.
    `panic_correlation_s`: DOWN verdicts that began within this many seconds of the
    decision that enters panic count as the same correlated fault. `degraded_margin`:
    a degraded region is restored only below `slow_ms` (and `utilization_high`) times
    (1 - margin).
    """

    regions: tuple[RegionSpec, ...]
    services: tuple[str, ...]
    demand_rps: Mapping[str, float] = field(default_factory=dict)
    features: tuple[FeatureSpec, ...] = ()
    observer_quorum: int | None = None
    observation_ttl_s: float = 10.0
    min_healthy_regions: int = 1
    recovery_hold_s: float = 30.0
    ramp_steps: tuple[float, ...] = (0.25, 0.5, 1.0)
    ramp_step_s: float = 10.0
    failover_budget_s: float = 30.0
    slow_ms: float = 1000.0
    utilization_high: float = 0.8
    degraded_factor: float = 0.5
    restore_margin: float = 0.1
    observers: Mapping[str, str] = field(default_factory=dict)
    panic_below: int = 1
    panic_correlation_s: float = 1.8
    degraded_margin: float = 0.2

    _by_name: Mapping[str, RegionSpec] = field(init=False, repr=False, compare=False)
    _by_service: Mapping[str, tuple[RegionSpec, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lookups decide() makes thousands of times per call on large deployments.
        object.__setattr__(self, "_by_name", {r.name: r for r in self.regions})
        by_service = {s: tuple(r for r in self.regions if s in r.capacity_rps) for s in self.services}
        object.__setattr__(self, "_by_service", by_service)

    def region(self, name: str) -> RegionSpec:
        return self._by_name[name]

    def regions_of(self, service: str) -> tuple[RegionSpec, ...]:
        """The regions that run `service`, in configured order."""
        return self._by_service.get(service, ())


@dataclass(frozen=True, slots=True)
class Placement(Record):
    """One (service, region) in a decision.

    `weight` and `state` are what load balancers act on. `verdict` is what the
    observers agree, which differs from `state` under a drain, during the recovery
    hold, or in panic. `verdict_since` is when the verdict last changed; `serving_since`
    is when the region last started taking traffic (the ramp counts from it; None when
    fully ramped); `ramp` is the fraction of its base share it may take now.
    """

    weight: int
    state: State
    verdict: Verdict = Verdict.UP
    verdict_since: float = 0.0
    serving_since: float | None = None
    ramp: float = 1.0


@dataclass(frozen=True, slots=True)
class Decision(Record):
    """The committed output. `revision` only grows; one decision per revision.

    `term`, `committed_at` and `leader` are stamped by the agent that commits it;
    `decide()` leaves them as they were. `intent_seq` is the highest intent seq the
    decision took into account, so a writer can tell which revision carries its intent.
    `next_review_at` is when time alone (hold expiry, ramp step) changes the outcome.
    `epoch` names the cluster state the revision counts in: chosen when that state was
    first created, so a rebuilt cluster (whose revisions start again) is told apart.
    For each service in `panic_services`, `panic_regions` holds the regions the panic
    may serve (before drains) and `panic_since` when the panic began; both are fixed
    for as long as the panic lasts.
    """

    revision: int
    services: Mapping[str, Mapping[str, Placement]]
    features: Mapping[str, bool]
    shed_fraction: float = 0.0
    panic: bool = False
    frozen: bool = False
    panic_services: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    intent_seq: int = 0
    decided_at: float = 0.0
    next_review_at: float | None = None
    term: int = 0
    committed_at: float = 0.0
    leader: str = ""
    epoch: str = ""
    panic_regions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    panic_since: Mapping[str, float] = field(default_factory=dict)

    def differs_only_in_reasons(self, other: Decision) -> bool:
        """Same weights, states, features and all, but other words for them."""
        return self.reasons != other.reasons and self.same_outcome(replace(other, reasons=self.reasons))

    def same_outcome(self, other: Decision) -> bool:
        """True when nothing a reader acts on or is told differs (ignores stamps)."""
        return (
            self.services == other.services
            and self.features == other.features
            and self.shed_fraction == other.shed_fraction
            and self.panic == other.panic
            and self.panic_services == other.panic_services
            and self.panic_regions == other.panic_regions
            and self.panic_since == other.panic_since
            and self.frozen == other.frozen
            and self.reasons == other.reasons
            and self.intent_seq == other.intent_seq
            and self.next_review_at == other.next_review_at
        )


# The name of the float flag that carries `Decision.shed_fraction` next to the features.
SHED_FRACTION_FLAG = "shed_fraction"


def flags_of(decision: Decision) -> dict[str, bool | float]:
    """A decision as feature flags: each feature a boolean, then `shed_fraction` a float.

    What the agents' OFREP endpoints serve and the SDK's OpenFeature provider reads.
    """
    flags: dict[str, bool | float] = {name: bool(on) for name, on in decision.features.items()}
    flags[SHED_FRACTION_FLAG] = float(decision.shed_fraction)
    return flags


# ---------------------------------------------------------------------------
# JSON shapes (DESIGN.md "Shapes"): the API, the stores and the CLI share these.


def iso_time(ts: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds, as every JSON shape writes it."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def decision_to_json(decision: Decision) -> dict[str, Any]:
    return {
        "revision": decision.revision,
        "term": decision.term,
        "committed_at": iso_time(decision.committed_at),
        "committed_at_unix": decision.committed_at,
        "leader": decision.leader,
        "panic": decision.panic,
        "panic_services": list(decision.panic_services),
        "panic_regions": {s: list(rs) for s, rs in decision.panic_regions.items()},
        "panic_since": dict(decision.panic_since),
        "frozen": decision.frozen,
        "shed_fraction": decision.shed_fraction,
        "services": {
            service: {
                region: {
                    "weight": p.weight,
                    "state": str(p.state),
                    "verdict": str(p.verdict),
                    "verdict_since": p.verdict_since,
                    "serving_since": p.serving_since,
                    "ramp": p.ramp,
                }
                for region, p in placements.items()
            }
            for service, placements in decision.services.items()
        },
        "features": dict(decision.features),
        "reasons": list(decision.reasons),
        "intent_seq": decision.intent_seq,
        "decided_at": decision.decided_at,
        "next_review_at": decision.next_review_at,
        "epoch": decision.epoch,
    }


def decision_from_json(data: Mapping[str, Any]) -> Decision:
    return Decision(
        revision=int(data["revision"]),
        term=int(data.get("term", 0)),
        committed_at=float(data.get("committed_at_unix", 0.0)),
        leader=str(data.get("leader", "")),
        panic=bool(data.get("panic", False)),
        panic_services=tuple(str(x) for x in data.get("panic_services", ())),
        panic_regions={str(s): tuple(str(r) for r in rs) for s, rs in data.get("panic_regions", {}).items()},
        panic_since={str(s): float(t) for s, t in data.get("panic_since", {}).items()},
        frozen=bool(data.get("frozen", False)),
        shed_fraction=float(data.get("shed_fraction", 0.0)),
        services={
            service: {
                region: Placement(
                    weight=int(p["weight"]),
                    state=State(p["state"]),
                    verdict=Verdict(p.get("verdict", "up")),
                    verdict_since=float(p.get("verdict_since", 0.0)),
                    serving_since=None if p.get("serving_since") is None else float(p["serving_since"]),
                    ramp=float(p.get("ramp", 1.0)),
                )
                for region, p in placements.items()
            }
            for service, placements in data["services"].items()
        },
        features={str(k): bool(v) for k, v in data.get("features", {}).items()},
        reasons=tuple(str(r) for r in data.get("reasons", ())),
        intent_seq=int(data.get("intent_seq", 0)),
        decided_at=float(data.get("decided_at", 0.0)),
        next_review_at=None if data.get("next_review_at") is None else float(data["next_review_at"]),
        epoch=str(data.get("epoch", "")),
    )


def observation_to_json(o: Observation) -> dict[str, Any]:
    return {
        "observer": o.observer,
        "region": o.region,
        "service": o.service,
        "up": o.up,
        "at": o.at,
        "latency_ms": o.latency_ms,
        "utilization": o.utilization,
        "error": o.error,
        "impaired": o.impaired,
        "inconclusive": o.inconclusive,
    }


def observation_from_json(data: Mapping[str, Any]) -> Observation:
    return Observation(
        observer=str(data["observer"]),
        region=str(data["region"]),
        service=str(data["service"]),
        up=bool(data["up"]),
        at=float(data["at"]),
        latency_ms=None if data.get("latency_ms") is None else float(data["latency_ms"]),
        utilization=None if data.get("utilization") is None else float(data["utilization"]),
        error=None if data.get("error") is None else str(data["error"]),
        impaired=None if data.get("impaired") is None else str(data["impaired"]),
        inconclusive=None if data.get("inconclusive") is None else str(data["inconclusive"]),
    )


def intent_to_json(i: Intent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": i.id,
        "kind": str(i.kind),
        "reason": i.reason,
        "who": i.who,
        "created_at": i.created_at,
        "seq": i.seq,
    }
    for name in ("region", "service", "feature", "enabled", "expires_at"):
        value = getattr(i, name)
        if value is not None:
            out[name] = value
    if i.from_region is not None:
        out["from"] = i.from_region
    if i.to_region is not None:
        out["to"] = i.to_region
    if i.weights is not None:
        out["weights"] = dict(i.weights)
    return out


def intent_from_json(data: Mapping[str, Any]) -> Intent:
    weights = data.get("weights")
    return Intent(
        id=str(data["id"]),
        kind=IntentKind(data["kind"]),
        reason=str(data.get("reason", "")),
        who=str(data.get("who", "unknown")),
        created_at=float(data.get("created_at", 0.0)),
        seq=int(data.get("seq", 0)),
        region=data.get("region"),
        service=data.get("service"),
        from_region=data.get("from"),
        to_region=data.get("to"),
        weights=None if weights is None else {str(k): int(v) for k, v in weights.items()},
        feature=data.get("feature"),
        enabled=data.get("enabled"),
        expires_at=None if data.get("expires_at") is None else float(data["expires_at"]),
    )
