"""The state of the world over time, replayed from a history's fault records.

The runner records, with every step, what it did in plain terms (`resolved`): agents
started, stopped, paused or resumed; directed Raft links cut or healed; backends set to
a mode. Replaying those gives, for any moment, which agents were running, which could
talk to which, which (region, service) backends were down: what the checker needs to
know what the agents were entitled to do. Pure: no clock, no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from controlplane.testing.chaos.history import Fault

DOWN_MODES = frozenset({"refuse", "blackhole", "503"})


@dataclass(frozen=True, slots=True)
class World:
    running: frozenset[str]
    paused: frozenset[str]
    started_at: Mapping[str, float]
    cut: frozenset[tuple[str, str]]  # directed links (src, dst) that carry nothing
    backends: Mapping[str, str]  # "region/service" -> mode ("up" when absent)
    topology_at: float  # the last time agents or links changed

    def live(self) -> frozenset[str]:
        """Running and not stopped: can answer and take part."""
        return self.running - self.paused

    def majority(self, agents: Sequence[str]) -> frozenset[str]:
        """The live agents in a component that holds a majority, both ways connected."""
        live = sorted(self.live())
        parent = {a: a for a in live}

        def find(a: str) -> str:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for i, a in enumerate(live):
            for b in live[i + 1 :]:
                if (a, b) not in self.cut and (b, a) not in self.cut:
                    parent[find(a)] = find(b)
        groups: dict[str, set[str]] = {}
        for a in live:
            groups.setdefault(find(a), set()).add(a)
        for group in groups.values():
            if len(group) * 2 > len(agents):
                return frozenset(group)
        return frozenset()

    def mode(self, region: str, service: str) -> str:
        return self.backends.get(f"{region}/{service}", "up")

    def down(self, region: str, service: str) -> bool:
        return self.mode(region, service) in DOWN_MODES


@dataclass
class Timeline:
    agents: tuple[str, ...]
    times: list[float] = field(default_factory=list)
    worlds: list[World] = field(default_factory=list)

    @staticmethod
    def replay(agents: Iterable[str], started: float, faults: Sequence[Fault]) -> Timeline:
        ids = tuple(agents)
        world = World(
            running=frozenset(ids),
            paused=frozenset(),
            started_at=dict.fromkeys(ids, started),
            cut=frozenset(),
            backends={},
            topology_at=started,
        )
        tl = Timeline(ids, [started], [world])
        for fault in sorted(faults, key=lambda f: f["at"]):
            world = apply(world, fault)
            tl.times.append(fault["at"])
            tl.worlds.append(world)
        return tl

    def at(self, t: float) -> World:
        i = bisect.bisect_right(self.times, t) - 1
        return self.worlds[max(0, i)]

    def between(self, t0: float, t1: float) -> list[World]:
        """Every world in force at some moment of [t0, t1]."""
        i0 = max(0, bisect.bisect_right(self.times, t0) - 1)
        i1 = max(0, bisect.bisect_right(self.times, t1) - 1)
        return self.worlds[i0 : i1 + 1]

    def changes(self, t0: float, t1: float) -> list[float]:
        """Times of records in (t0, t1]."""
        i0 = bisect.bisect_right(self.times, t0)
        i1 = bisect.bisect_right(self.times, t1)
        return self.times[i0:i1]

    def down_since(self, region: str, service: str, t: float) -> float | None:
        """When the backend of (region, service) last went down, if it is down at `t`."""
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0 or not self.worlds[i].down(region, service):
            return None
        while i > 0 and self.worlds[i - 1].down(region, service):
            i -= 1
        return self.times[i]

    def able_since(self, t: float, settle_s: float) -> float | None:
        """Since when a majority has been live and connected with no topology change.

        None when no majority can decide at `t`. Otherwise the start of the current run
        of worlds with a majority, pushed past the last topology change by `settle_s`
        (restarts need to load, elections to run, probes to rise or fall).
        """
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0:
            return None
        world = self.worlds[i]
        if not world.majority(self.agents):
            return None
        since = world.topology_at + settle_s
        return since if since <= t else None


def apply(world: World, fault: Fault) -> World:
    """The world after one recorded step."""
    r = fault["resolved"]
    t = fault["at"]
    running = set(world.running)
    paused = set(world.paused)
    started_at = dict(world.started_at)
    cut = set(world.cut)
    topology = False
    for a in r.get("started", ()):
        running.add(a)
        paused.discard(a)
        started_at[a] = t
        topology = True
    for a in r.get("stopped", ()):
        running.discard(a)
        paused.discard(a)
        topology = True
    for a in r.get("paused", ()):
        paused.add(a)
        topology = True
    for a in r.get("resumed", ()):
        paused.discard(a)
        topology = True
    if r.get("heal_links"):
        cut.clear()
        topology = True
    for src, dst in r.get("cut", ()):
        cut.add((src, dst))
        topology = True
    backends = dict(world.backends)
    for pair, mode in r.get("backends", {}).items():
        if mode == "up":
            backends.pop(pair, None)
        else:
            backends[pair] = mode
    return replace(
        world,
        running=frozenset(running),
        paused=frozenset(paused),
        started_at=started_at,
        cut=frozenset(cut),
        backends=backends,
        topology_at=t if topology else world.topology_at,
    )
