"""A small world for decision tests: a policy, observers, and a way to say what they see."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import count

from controlplane.decide import decide
from controlplane.intents import apply_intent
from controlplane.model import (
    Decision,
    FeatureSpec,
    Intent,
    IntentKind,
    Observation,
    Policy,
    RegionSpec,
)

OBSERVERS = ("agent-east-1", "agent-south-1", "agent-north-1")


def make_policy(
    capacities: Mapping[str, float] | None = None,
    services: Iterable[str] = ("order",),
    demand: Mapping[str, float] | None = None,
    features: Iterable[FeatureSpec] = (),
    **knobs: object,
) -> Policy:
    capacities = capacities or {"cn-east": 6000, "cn-south": 5000, "cn-north": 4000}
    services = tuple(services)
    regions = tuple(
        RegionSpec(name=r, capacity_rps=dict.fromkeys(services, c), base_weight=dict.fromkeys(services, c))
        for r, c in capacities.items()
    )
    defaults: dict[str, object] = {
        "recovery_hold_s": 10.0,
        "ramp_steps": (0.25, 0.5, 1.0),
        "ramp_step_s": 5.0,
    }
    defaults.update(knobs)
    return Policy(
        regions=regions,
        services=services,
        demand_rps=dict(demand or {}),
        features=tuple(features),
        **defaults,  # type: ignore[arg-type]
    )


@dataclass
class World:
    """Observers, intents and the last decision, advanced by hand."""

    policy: Policy
    now: float = 1_000.0
    observers: tuple[str, ...] = OBSERVERS
    # (observer, region, service) -> (up, latency_ms, utilization, error)
    seen: dict[tuple[str, str, str], tuple[bool, float | None, float | None, str | None]] = field(
        default_factory=dict
    )
    intents: dict[str, Intent] = field(default_factory=dict)
    # observer -> what it says about its own view (Observation.impaired)
    impaired: dict[str, str] = field(default_factory=dict)
    decision: Decision | None = None
    _ids: count[int] = field(default_factory=lambda: count(1))

    def __post_init__(self) -> None:
        for observer in self.observers:
            for region in self.policy.regions:
                for service in region.capacity_rps:
                    self.seen[(observer, region.name, service)] = (True, 20.0, None, None)

    def see(
        self,
        region: str,
        *,
        up: bool = True,
        by: Iterable[str] | None = None,
        service: str | None = None,
        latency_ms: float | None = 20.0,
        utilization: float | None = None,
        error: str | None = None,
    ) -> None:
        for observer in by if by is not None else self.observers:
            for service_name in [service] if service else self.policy.services:
                if (observer, region, service_name) in self.seen:
                    err = error if error is not None else (None if up else "connect timeout")
                    self.seen[(observer, region, service_name)] = (up, latency_ms, utilization, err)

    def observations(self, silent: Iterable[str] = ()) -> list[Observation]:
        quiet = set(silent)
        return [
            Observation(
                observer=o,
                region=r,
                service=s,
                up=up,
                at=self.now,
                latency_ms=lat,
                utilization=u,
                error=e,
                impaired=self.impaired.get(o),
            )
            for (o, r, s), (up, lat, u, e) in self.seen.items()
            if o not in quiet
        ]

    def intent(self, kind: IntentKind, **fields: object) -> Intent:
        n = next(self._ids)
        fields.setdefault("reason", "test")
        fields.setdefault("who", "sre")
        i = Intent(id=f"i{n}", kind=kind, seq=n, created_at=self.now, **fields)  # type: ignore[arg-type]
        self.intents = apply_intent(self.intents, i)
        return i

    def step(self, dt: float = 1.0, silent: Iterable[str] = ()) -> Decision:
        self.now += dt
        self.decision = decide(self.policy, self.observations(silent), self.intents, self.decision, self.now)
        return self.decision

    def settle(self, seconds: float, dt: float = 1.0) -> Decision:
        end = self.now + seconds
        while self.now < end:
            self.step(dt)
        assert self.decision is not None
        return self.decision

    def weights(self, service: str = "order") -> dict[str, int]:
        assert self.decision is not None
        return {r: p.weight for r, p in self.decision.services[service].items()}

    def states(self, service: str = "order") -> dict[str, str]:
        assert self.decision is not None
        return {r: str(p.state) for r, p in self.decision.services[service].items()}

    def reasons(self) -> str:
        assert self.decision is not None
        return "\n".join(self.decision.reasons)

    def with_policy(self, **knobs: object) -> World:
        self.policy = replace(self.policy, **knobs)  # type: ignore[arg-type]
        return self
