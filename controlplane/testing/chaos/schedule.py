"""Seeded fault schedules: a pure function of (seed, shape of the cluster, mix).

A schedule is a list of timed steps (offsets in seconds from the start of the fault
phase) that the runner plays against real agents. Nothing here reads a clock or the
cluster: the same seed and the same `Shape` give the same steps, byte for byte, so any
schedule can be replayed from its seed alone (`describe` prints it).

Steps are generated per track so that faults overlap the way real outages do:

- the agent track: SIGKILL and restart, SIGSTOP and SIGCONT, a clock offset (the agent
  restarted under libfaketime, later restarted without it); the target is an agent or
  `@leader`, resolved when the step runs (the leader often);
- the network track: partitions of the Raft links (minority, majority, halves, bridge,
  one-way), in reset or black-hole mode, then healed;
- the backend track: one region or all, every service or one, refusing, black-holed,
  503, slow or flapping, then healed;
- the intent track: bursts of concurrent operator intents to different agents (with and
  without client ids, retries of the same id to another agent, deletes), each standing
  intent later cleared by its counterpart;
- at most one full-cluster restart.

Everything is healed before the schedule ends; the runner then clears standing intents
and waits a quiet period for the cluster to converge.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LEADER = "@leader"

# Relative weights of each kind of episode; a kind with weight 0 never appears.
DEFAULT_MIX: Mapping[str, float] = {
    "kill": 2.0,
    "pause": 2.0,
    "clock": 1.0,
    "partition": 3.0,
    "backend": 3.0,
    "intents": 3.0,
    "full_restart": 0.4,
}

BACKEND_MODES = ("refuse", "blackhole", "503", "slow", "flap")
PARTITION_KINDS = ("minority", "majority", "halves", "bridge", "one_way")


@dataclass(frozen=True, slots=True)
class Shape:
    """What the generator needs to know about the cluster and how long to run."""

    agents: tuple[str, ...]
    regions: tuple[str, ...]
    services: tuple[str, ...]
    features: tuple[str, ...] = ()
    duration_s: float = 30.0
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_clock_offset_s: float = 30.0
    # Slow backends answer in this many ms: above the policy's slow_ms, below the probe timeout.
    slow_latency_ms: float = 350.0

    def to_json(self) -> dict[str, Any]:
        return {
            "agents": list(self.agents),
            "regions": list(self.regions),
            "services": list(self.services),
            "features": list(self.features),
            "duration_s": self.duration_s,
            "mix": dict(self.mix),
            "max_clock_offset_s": self.max_clock_offset_s,
            "slow_latency_ms": self.slow_latency_ms,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Shape:
        return Shape(
            agents=tuple(data["agents"]),
            regions=tuple(data["regions"]),
            services=tuple(data["services"]),
            features=tuple(data.get("features", ())),
            duration_s=float(data.get("duration_s", 30.0)),
            mix=dict(data.get("mix", DEFAULT_MIX)),
            max_clock_offset_s=float(data.get("max_clock_offset_s", 30.0)),
            slow_latency_ms=float(data.get("slow_latency_ms", 350.0)),
        )


@dataclass(frozen=True, slots=True)
class Step:
    """One action at `at_s` seconds into the fault phase.

    `action` names what the runner does; `args` are JSON values. `episode` ties a fault
    to the step that heals it.
    """

    index: int
    at_s: float
    action: str
    args: Mapping[str, Any]
    episode: int

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"#{self.index:>3} t+{self.at_s:6.2f}s ep{self.episode:<3} {self.action} {args}".rstrip()

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "at_s": self.at_s,
            "action": self.action,
            "args": dict(self.args),
            "episode": self.episode,
        }


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    shape: Shape
    steps: tuple[Step, ...]

    def describe(self) -> str:
        head = (
            f"schedule seed={self.seed} agents={len(self.shape.agents)} "
            f"duration={self.shape.duration_s:g}s steps={len(self.steps)}"
        )
        return "\n".join([head, *(s.describe() for s in self.steps)])

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "shape": self.shape.to_json(), "steps": [s.to_json() for s in self.steps]}


def coverage(schedule: Schedule) -> set[str]:
    """The kinds of fault a schedule plays, finely: `partition:bridge`, `pause:leader`,
    `backend:flap`, `intent:failover`, `retry`... Pure; used to choose short runs that
    cover the whole mix."""
    out: set[str] = set()
    for step in schedule.steps:
        action, args = step.action, step.args
        if action == "partition":
            out |= {action, f"partition:{args['kind']}", f"partition_mode:{args['mode']}"}
        elif action in ("kill", "pause", "clock"):
            out.add(action)
            if args.get("target") == LEADER:
                out.add(f"{action}:leader")
            if action == "kill":
                out.add(f"kill:{args['signal']}")
        elif action == "backend":
            out |= {action, f"backend:{args['mode']}"}
            if len(args["regions"]) > 1:
                out.add("backend:all_regions")
        elif action == "intent":
            out |= {action, f"intent:{args['body']['kind']}"}
            if args.get("retry"):
                out.add("intent:retry")
            if args.get("id"):
                out.add("intent:client_id")
        elif action in ("delete_intent", "full_stop"):
            out.add(action)
    return out


# -- generation -----------------------------------------------------------------------


@dataclass
class _Draft:
    at_s: float
    action: str
    args: dict[str, Any]
    episode: int
    order: int = 0


@dataclass
class _Gen:
    rng: random.Random
    shape: Shape
    drafts: list[_Draft] = field(default_factory=list)
    episodes: int = 0

    def add(self, at_s: float, action: str, episode: int, **args: Any) -> None:
        self.drafts.append(_Draft(round(at_s, 2), action, args, episode, len(self.drafts)))

    def episode(self) -> int:
        self.episodes += 1
        return self.episodes

    def agent_or_leader(self, p_leader: float = 0.5) -> str:
        return LEADER if self.rng.random() < p_leader else self.rng.choice(self.shape.agents)


def generate(seed: int, shape: Shape) -> Schedule:
    """The schedule of `seed` for `shape`: the same inputs always give the same steps."""
    rng = random.Random(f"controlplane-chaos/{seed}")
    gen = _Gen(rng, shape)
    end = shape.duration_s
    mix = {k: v for k, v in shape.mix.items() if v > 0}
    tracks: dict[str, list[str]] = {
        "agent": [k for k in ("kill", "pause", "clock") if k in mix],
        "network": ["partition"] if "partition" in mix else [],
        "backend": ["backend"] if "backend" in mix else [],
        "intents": ["intents"] if "intents" in mix else [],
    }
    # Parallel agent faults: as many as leave a majority up, so that most of the time the
    # cluster can still decide and the checker has something to judge.
    lanes = {"agent": max(1, (len(shape.agents) - 1) // 2), "network": 1, "backend": 1, "intents": 2}
    for track, kinds in tracks.items():
        if not kinds:
            continue
        for _lane in range(lanes[track]):
            t = rng.uniform(0.5, 4.0)
            while t < end - 2.0:
                kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
                t = _EPISODES[kind](gen, t, end)
                t += rng.uniform(0.5, 4.0)
    if "full_restart" in mix and rng.random() < min(1.0, mix["full_restart"]):
        _full_restart(gen, rng.uniform(end * 0.2, end * 0.8), end)
    ordered = sorted(gen.drafts, key=lambda d: (d.at_s, d.order))
    steps = tuple(
        Step(index=i, at_s=d.at_s, action=d.action, args=d.args, episode=d.episode)
        for i, d in enumerate(ordered)
    )
    return Schedule(seed=seed, shape=shape, steps=steps)


def _duration(gen: _Gen, t: float, end: float, low: float, high: float) -> float:
    """A fault length, cut so that it heals at least a second before the end."""
    return max(0.3, min(gen.rng.uniform(low, high), end - 1.0 - t))


def _kill(gen: _Gen, t: float, end: float) -> float:
    ep = gen.episode()
    target = gen.agent_or_leader()
    sig = gen.rng.choice(("SIGKILL", "SIGKILL", "SIGTERM"))
    gen.add(t, "kill", ep, target=target, signal=sig)
    down = _duration(gen, t, end, 0.5, 6.0)
    gen.add(t + down, "restart", ep, target=f"@episode:{ep}")
    return t + down


def _pause(gen: _Gen, t: float, end: float) -> float:
    ep = gen.episode()
    target = gen.agent_or_leader(0.6)
    gen.add(t, "pause", ep, target=target)
    length = _duration(gen, t, end, 0.3, 6.0)
    gen.add(t + length, "resume", ep, target=f"@episode:{ep}")
    return t + length


def _clock(gen: _Gen, t: float, end: float) -> float:
    ep = gen.episode()
    target = gen.agent_or_leader(0.4)
    limit = gen.shape.max_clock_offset_s
    offset = round(gen.rng.uniform(3.0, limit), 1) * gen.rng.choice((-1, 1))
    gen.add(t, "clock", ep, target=target, offset_s=offset)
    length = _duration(gen, t, end, 4.0, 12.0)
    gen.add(t + length, "clock_heal", ep, target=f"@episode:{ep}")
    return t + length


def _partition(gen: _Gen, t: float, end: float) -> float:
    ep = gen.episode()
    rng = gen.rng
    agents = list(gen.shape.agents)
    kind = rng.choice(PARTITION_KINDS)
    mode = rng.choice(("reset", "blackhole"))
    args: dict[str, Any] = {"kind": kind, "mode": mode}
    if kind in ("minority", "one_way"):
        args["target"] = gen.agent_or_leader(0.6)
        if kind == "one_way":
            # Which way the target is deaf: it cannot send ("out") or cannot hear ("in").
            args["direction"] = rng.choice(("out", "in"))
    else:
        rng.shuffle(agents)
        args["order"] = agents
    gen.add(t, "partition", ep, **args)
    length = _duration(gen, t, end, 1.0, 8.0)
    gen.add(t + length, "heal_network", ep)
    return t + length


def _backend(gen: _Gen, t: float, end: float) -> float:
    ep = gen.episode()
    rng = gen.rng
    regions = list(gen.shape.regions) if rng.random() < 0.2 else [rng.choice(gen.shape.regions)]
    service = None if rng.random() < 0.6 else rng.choice(gen.shape.services)
    mode = rng.choice(BACKEND_MODES)
    args: dict[str, Any] = {"regions": regions, "service": service, "mode": mode}
    if mode == "flap":
        args["period_s"] = round(rng.uniform(0.7, 3.0), 2)
    if mode == "slow":
        args["latency_ms"] = gen.shape.slow_latency_ms
    gen.add(t, "backend", ep, **args)
    length = _duration(gen, t, end, 2.0, 12.0)
    gen.add(t + length, "backend_heal", ep, regions=regions, service=service)
    return t + length


# Freezes are rarer: while frozen no verdict changes, so a dead region cannot be judged.
_INTENT_KINDS = (
    *("drain", "drain", "drain"),
    *("feature", "feature"),
    *("override", "override"),
    *("freeze", "failover"),
)


def _intents(gen: _Gen, t: float, end: float) -> float:
    """A burst of concurrent intents to different agents, each cleared later."""
    rng = gen.rng
    shape = gen.shape
    ep = gen.episode()
    count = rng.randint(1, 3)
    clear_at = t + _duration(gen, t, end, 1.0, 8.0)
    for k in range(count):
        kind = rng.choice(_INTENT_KINDS)
        body: dict[str, Any]
        region = rng.choice(shape.regions)
        if kind == "drain":
            service = None if rng.random() < 0.5 else rng.choice(shape.services)
            body = {"kind": "drain", "region": region, "service": service}
            undo: dict[str, Any] | None = {"kind": "undrain", "region": region, "service": service}
        elif kind == "feature" and shape.features:
            name = rng.choice(shape.features)
            body = {"kind": "feature", "name": name, "enabled": False}
            undo = {"kind": "feature", "name": name, "enabled": True}
        elif kind == "override":
            service = rng.choice(shape.services)
            # Every region keeps some weight: an override never sends all traffic to one
            # region, so a dead region's zero is still the verdict's to give.
            raw = [rng.randint(10, 60) for _ in shape.regions]
            weights = _to_100(raw)
            by_region = dict(zip(shape.regions, weights, strict=True))
            body = {"kind": "override", "service": service, "weights": by_region}
            undo = None  # deleted by id
        elif kind == "freeze":
            body = {"kind": "freeze"}
            undo = {"kind": "unfreeze"}
        else:
            others = [r for r in shape.regions if r != region]
            body = {"kind": "failover", "from": region, "to": rng.choice(others), "service": None}
            undo = None
        body["reason"] = f"chaos seed step {ep}.{k}"
        client_id = f"chaos-{ep}-{k}-{rng.randrange(16**6):06x}" if rng.random() < 0.6 else None
        at = t + rng.uniform(0.0, 0.3)
        gen.add(at, "intent", ep, target=rng.choice(shape.agents), body=body, id=client_id, tag=f"{ep}.{k}")
        if client_id is not None and rng.random() < 0.35:
            # The client did not hear the answer and retries the same id elsewhere.
            gen.add(
                at + rng.uniform(0.0, 1.0),
                "intent",
                ep,
                target=rng.choice(shape.agents),
                body=body,
                id=client_id,
                tag=f"{ep}.{k}",
                retry=True,
            )
        undo_at = max(at + 0.2, clear_at + rng.uniform(-0.5, 0.5))
        if undo is None or rng.random() < 0.3:
            gen.add(undo_at, "delete_intent", ep, target=rng.choice(shape.agents), tag=f"{ep}.{k}")
        else:
            undo["reason"] = f"chaos undo {ep}.{k}"
            target = rng.choice(shape.agents)
            gen.add(undo_at, "intent", ep, target=target, body=undo, id=None, tag=f"{ep}.{k}u")
    return clear_at


def _full_restart(gen: _Gen, t: float, end: float) -> None:
    ep = gen.episode()
    gen.add(t, "full_stop", ep, signal=gen.rng.choice(("SIGKILL", "SIGTERM")))
    gen.add(t + _duration(gen, t, end, 0.5, 3.0), "full_start", ep)


def _to_100(raw: Sequence[int]) -> list[int]:
    total = sum(raw)
    out = [r * 100 // total for r in raw]
    out[0] += 100 - sum(out)
    return out


_EPISODES = {
    "kill": _kill,
    "pause": _pause,
    "clock": _clock,
    "partition": _partition,
    "backend": _backend,
    "intents": _intents,
}


def partition_groups(kind: str, order: Sequence[str]) -> list[list[str]]:
    """The groups a partition of `kind` splits `order` (a shuffled agent list) into.

    Agents in one group talk; links between groups are cut, except that in a `bridge`
    the first group's member talks to both others. Pure, so the checker sees the same.
    """
    n = len(order)
    agents = list(order)
    if kind == "majority":
        # No group holds a majority: every agent alone with 3, 2/2/1 with 5.
        if n <= 3:
            return [[a] for a in agents]
        return [agents[:2], agents[2:4], agents[4:]]
    if kind == "halves":
        half = n // 2
        return [agents[:half], agents[half:]]
    if kind == "bridge":
        # agents[0] is the bridge; the rest split in two sides that cannot talk.
        rest = agents[1:]
        half = len(rest) // 2
        return [agents[:1], rest[:half], rest[half:]]
    raise ValueError(f"no groups for partition kind {kind!r}")
