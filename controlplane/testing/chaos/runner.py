"""Plays one seeded schedule against a real cluster and returns its history.

For each schedule: a fresh `LocalCluster` (3 or 5 agent processes, the raft backend
with a `FaultProxy` on every directed Raft link, or the etcd backend on a private
`LocalEtcd`), simulated backends, a `Recorder` on every agent; then the steps at their
times, then everything healed (agents started and resumed, links healed, backends up,
clock offsets removed), standing intents deleted, and a bounded quiet period until the
cluster converges. Every process, proxy and port is released in `finally`, whatever
happened. Nothing here judges: the checker reads the history afterwards.

Backend-agnostic: the agents are only driven through signals, their HTTP API and the
network between them, so the same runner judges the embedded engine
(`controlplane/raft/`) and etcd alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.testing.chaos.history import AgentFinal, History, Params
from controlplane.testing.chaos.recorder import Recorder
from controlplane.testing.chaos.schedule import (
    DEFAULT_MIX,
    LEADER,
    Schedule,
    Shape,
    Step,
    generate,
    partition_groups,
)
from controlplane.testing.etcdlocal import LocalEtcd
from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports
from controlplane.testing.ports import free_port

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def faketime_env(offset_s: float) -> dict[str, str]:
    """Environment that runs a process with its wall clock `offset_s` off.

    Not `DONT_FAKE_MONOTONIC=1` (which `localcluster.clock_offset_env` sets): with
    Debian's libfaketime 0.9.10 it makes every `time.sleep` fail with EINVAL
    (clock_nanosleep with an absolute monotonic deadline), and the engine's graceful stop
    sleeps while it hands leadership over; the harness would then be judging libfaketime.
    Without it the monotonic clock gets a constant offset too: its epoch is arbitrary and
    every interval measured on it is unchanged (tests/chaos/test_schedule.py checks both).
    """
    return {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": f"{offset_s:+g}s"}


EXTRA_AGENTS = (("agent-east-2", "cn-east"), ("agent-south-2", "cn-south"))
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=0.5)


@dataclass(frozen=True, slots=True)
class Options:
    agents: int = 3
    backend: str = "raft"  # "raft" | "etcd"
    duration_s: float = 30.0
    quiet_max_s: float = 45.0  # bound on waiting for convergence after the heal
    quiet_stable_s: float = 2.0  # converged this long before the quiet period ends
    poll_interval_s: float = 0.1
    mix: Mapping[str, float] | None = None
    workdir: Path | None = None
    keep_workdir: bool = False


def cluster_config(agents: int, backend: str, etcd_endpoint: str | None = None) -> dict[str, Any]:
    """The demo deployment on free ports, shorter holds; 5 agents adds one in cn-east and cn-south."""
    if agents not in (3, 5):
        raise ValueError(f"agents must be 3 or 5 (got {agents})")
    config = remap_ports(load_demo_config())
    config["policy"].update({"recovery_hold_s": 2.0, "ramp_step_s": 1.5})
    if agents == 5:
        taken = {int(a[k].rpartition(":")[2]) for a in config["cluster"]["agents"] for k in ("raft", "http")}
        for agent_id, region in EXTRA_AGENTS:
            raft = free_port(exclude=taken)
            taken.add(raft)
            http = free_port(exclude=taken)
            taken.add(http)
            config["cluster"]["agents"].append(
                {"id": agent_id, "region": region, "raft": f"127.0.0.1:{raft}", "http": f"127.0.0.1:{http}"}
            )
    if backend == "etcd":
        if etcd_endpoint is None:
            raise ValueError("the etcd backend needs an endpoint")
        config["backend"] = {
            "kind": "etcd",
            "etcd": {"endpoints": [etcd_endpoint], "prefix": "/chaos", "lease_ttl_s": 3, "timeout_s": 1.0},
        }
    elif backend != "raft":
        raise ValueError(f"backend must be raft or etcd (got {backend!r})")
    return config


def shape_of(config: Mapping[str, Any], options: Options) -> Shape:
    mix = dict(options.mix if options.mix is not None else DEFAULT_MIX)
    if options.backend == "etcd":
        # The agents do not talk to each other on etcd: there are no Raft links to cut.
        mix["partition"] = 0.0
    return Shape(
        agents=tuple(a["id"] for a in config["cluster"]["agents"]),
        regions=tuple(config["regions"]),
        services=tuple(dict.fromkeys(s for r in config["regions"].values() for s in r["services"])),
        features=tuple(config.get("features", {})),
        duration_s=options.duration_s,
        mix=mix,
    )


def params_of(config: Mapping[str, Any]) -> Params:
    probes = config["probes"]
    agents = len(config["cluster"]["agents"])
    quorum = config["policy"].get("observer_quorum") or agents // 2 + 1
    return Params(
        detection_window_s=probes["fall"] * probes["interval_s"] + probes["timeout_s"],
        commit_slack_s=3.0,
        settle_s=6.0,
        fresh_lag_s=3.0,
        read_grace_s=8.0,
        read_outage_s=3.0,
        write_settle_s=5.0,
        observer_quorum=int(quorum),
    )


def at_rest(decision: Mapping[str, Any] | None) -> bool:
    """A decision that can serve as the baseline: fresh, every pair healthy at full ramp,
    no panic, freeze, shedding or feature off.

    A settled revision is not enough: on a loaded machine the first probes may time out,
    and a revision that holds still for a while can be one of a recovery's hold or ramp
    (5 agents, seed 37: the baseline was taken mid-recovery, so convergence to the real
    base weights was reported as a violation).
    """
    if not decision or decision.get("stale") or decision.get("panic") or decision.get("frozen"):
        return False
    if decision.get("shed_fraction") or not all(decision.get("features", {}).values()):
        return False
    return all(
        pair.get("state") == "healthy" and pair.get("ramp", 1.0) == 1.0
        for regions in decision.get("services", {}).values()
        for pair in regions.values()
    )


def probe_kinds(config: Mapping[str, Any]) -> dict[str, str]:
    """`region/service` -> "tcp" or "http": what a backend fault looks like to the probes."""
    out = {}
    for region, rc in config["regions"].items():
        for service, sc in rc["services"].items():
            t = sc["targets"][0]
            url = t if isinstance(t, str) else t["url"]
            out[f"{region}/{service}"] = "tcp" if url.startswith("tcp://") else "http"
    return out


@dataclass
class _Run:
    schedule: Schedule
    cluster: LocalCluster
    recorder: Recorder
    config: dict[str, Any]
    faults_from: float = 0.0
    paused: set[str] = field(default_factory=set)
    clock_env: dict[str, dict[str, str]] = field(default_factory=dict)
    episode_agent: dict[int, str] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)  # intent tag -> id
    client_ids: dict[str, str] = field(default_factory=dict)
    writes: list[asyncio.Task[None]] = field(default_factory=list)
    expected_exit: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def agents(self) -> tuple[str, ...]:
        return self.schedule.shape.agents

    def running(self, agent: str) -> bool:
        return self.cluster.agents[agent].alive

    # -- resolving targets ------------------------------------------------------------

    async def leader(self, step: Step) -> str:
        """The agent that says it leads with quorum; a seeded pick when none answers."""
        live = [a for a in self.agents if self.running(a) and a not in self.paused]

        async def ask(agent: str) -> bool:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with self.recorder.session.get(
                    self.cluster.agents[agent].url + "/v1/cluster", timeout=LOOKUP_TIMEOUT
                ) as r:
                    body = await r.json(content_type=None)
                    return bool(r.status == 200 and body.get("is_leader") and body.get("has_quorum"))
            return False

        answers = await asyncio.gather(*(ask(a) for a in live))
        leaders = [a for a, yes in zip(live, answers, strict=True) if yes]
        if leaders:
            return leaders[0]
        rng = random.Random(f"{self.schedule.seed}/{step.index}")
        return rng.choice(live or list(self.agents))

    async def target(self, step: Step) -> str:
        raw = str(step.args.get("target", ""))
        if raw == LEADER:
            agent = await self.leader(step)
        elif raw.startswith("@episode:"):
            agent = self.episode_agent[int(raw.partition(":")[2])]
        else:
            agent = raw
        self.episode_agent.setdefault(step.episode, agent)
        return agent

    # -- agents -----------------------------------------------------------------------

    async def stop(self, agent: str, sig: signal.Signals) -> bool:
        if not self.running(agent):
            return False
        self.expected_exit.add(agent)
        try:
            await self.cluster.stop_agent(agent, sig, timeout_s=STOP_TIMEOUT_S)
        except TimeoutError:
            self.notes.append(f"{agent} ignored {sig.name} for {STOP_TIMEOUT_S:g} s; killed")
            await self.cluster.stop_agent(agent, signal.SIGKILL, timeout_s=STOP_TIMEOUT_S)
        self.paused.discard(agent)
        return True

    def start(self, agent: str) -> bool:
        if self.running(agent):
            return False
        self.cluster.start_agent(agent, extra_env=self.clock_env.get(agent))
        self.expected_exit.discard(agent)
        return True

    async def watch_exits(self) -> None:
        """Record an agent process that exits without being told to, with its log's tail."""
        while True:
            for agent in self.agents:
                proc = self.cluster.agents[agent].proc
                if proc is None or agent in self.expected_exit or proc.poll() is None:
                    continue
                self.expected_exit.add(agent)
                self.paused.discard(agent)
                tail = self.cluster.log_of(agent)[-1500:]
                self.recorder.fault(
                    -1,
                    0,
                    "crashed",
                    {},
                    {"agent": agent, "stopped": [agent], "exit_code": proc.returncode},
                    note=tail,
                )
            await asyncio.sleep(0.25)

    # -- steps ------------------------------------------------------------------------

    async def play_all(self) -> None:
        """Every step at its time. A step that takes a while (an agent that is slow to stop)
        holds up only the later steps of its own episode, never the other tracks."""
        chains: dict[int, asyncio.Task[None]] = {}
        try:
            for step in self.schedule.steps:
                delay = self.faults_from + step.at_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                chains[step.episode] = asyncio.create_task(self._after(chains.get(step.episode), step))
            await asyncio.gather(*chains.values())
            await asyncio.gather(*self.writes, return_exceptions=True)
        finally:
            for task in [*chains.values(), *self.writes]:
                task.cancel()
            await asyncio.gather(*chains.values(), *self.writes, return_exceptions=True)
            self.writes.clear()

    async def _after(self, previous: asyncio.Task[None] | None, step: Step) -> None:
        if previous is not None:
            await previous
        await self.play(step)

    async def play(self, step: Step) -> None:
        resolved: dict[str, Any] = {}
        note = None
        at = time.monotonic()
        action = step.action
        if action in ("kill", "restart", "pause", "resume", "clock", "clock_heal"):
            agent = await self.target(step)
            resolved["agent"] = agent
            at = time.monotonic()
            if action == "kill":
                if await self.stop(agent, signal.Signals[step.args["signal"]]):
                    resolved["stopped"] = [agent]
            elif action == "restart":
                if self.start(agent):
                    resolved["started"] = [agent]
            elif action == "pause":
                if self.running(agent) and agent not in self.paused:
                    self.cluster.pause_agent(agent)
                    self.paused.add(agent)
                    resolved["paused"] = [agent]
            elif action == "resume":
                if agent in self.paused:
                    self.cluster.resume_agent(agent)
                    self.paused.discard(agent)
                    resolved["resumed"] = [agent]
            else:
                offset = float(step.args.get("offset_s", 0.0)) if action == "clock" else 0.0
                if action == "clock":
                    self.clock_env[agent] = faketime_env(offset)
                else:
                    self.clock_env.pop(agent, None)
                resolved["offset_s"] = offset
                if await self.stop(agent, signal.SIGTERM):
                    # It stops serving when signalled, however long it takes to exit.
                    self.recorder.fault(
                        step.index, step.episode, action, step.args, {**resolved, "stopped": [agent]}, at=at
                    )
                    at = time.monotonic()
                    self.start(agent)
                    resolved["started"] = [agent]
        elif action == "partition":
            resolved.update(await self.partition(step))
        elif action == "heal_network":
            if self.cluster.mesh is not None:
                self.cluster.mesh.heal_all()
            resolved["heal_links"] = True
        elif action in ("backend", "backend_heal"):
            resolved["backends"] = await self.backend(step)
        elif action == "intent":
            self.intent(step)
            resolved["sent"] = True
        elif action == "delete_intent":
            note = self.delete(step)
        elif action == "full_stop":
            sig = signal.Signals[step.args["signal"]]
            stopped = await asyncio.gather(*(self.stop(a, sig) for a in self.agents))
            resolved["stopped"] = [a for a, yes in zip(self.agents, stopped, strict=True) if yes]
        elif action == "full_start":
            resolved["started"] = [a for a in self.agents if self.start(a)]
        self.recorder.fault(step.index, step.episode, action, step.args, resolved, at=at, note=note)

    async def partition(self, step: Step) -> dict[str, Any]:
        kind = step.args["kind"]
        links: list[tuple[str, str]]
        if kind in ("minority", "one_way"):
            agent = await self.target(step)
            others = [a for a in self.agents if a != agent]
            if kind == "minority":
                links = [(agent, o) for o in others] + [(o, agent) for o in others]
            elif step.args.get("direction") == "out":
                links = [(agent, o) for o in others]
            else:
                links = [(o, agent) for o in others]
        else:
            groups = partition_groups(kind, step.args["order"])
            group_of = {a: i for i, g in enumerate(groups) for a in g}
            links = [
                (a, b)
                for a in self.agents
                for b in self.agents
                if a != b
                and group_of[a] != group_of[b]
                and not (kind == "bridge" and 0 in (group_of[a], group_of[b]))
            ]
        if self.cluster.mesh is not None:
            for src, dst in links:
                self.cluster.mesh.link(src, dst).partition(step.args.get("mode", "reset"))
        return {"cut": [list(link) for link in links]} if self.cluster.mesh is not None else {}

    async def backend(self, step: Step) -> dict[str, str]:
        kinds = probe_kinds(self.config)
        regions = step.args["regions"]
        service = step.args.get("service")
        changed: dict[str, str] = {}
        heal = step.action == "backend_heal"
        mode = "up" if heal else str(step.args["mode"])
        state: dict[str, Any]
        if heal:
            state = {"healthy": True, "mode": "normal", "latency_ms": 0}
        elif mode == "refuse":
            state = {"healthy": False, "mode": "refuse"}
        elif mode == "blackhole":
            state = {"mode": "blackhole"}
        elif mode == "503":
            state = {"healthy": False}
        elif mode == "slow":
            state = {"latency_ms": float(step.args.get("latency_ms", 350.0))}
        else:
            state = {"flap_period_s": float(step.args["period_s"])}
        for region in regions:
            await self.cluster.set_backend(region, service, **state)
            for pair, kind in kinds.items():
                r, _, s = pair.partition("/")
                if r != region or (service is not None and s != service):
                    continue
                # A TCP probe only sees a refused connection; to it the rest is up.
                effective = mode if kind == "http" or mode in ("refuse", "up") else f"{mode} (tcp open)"
                changed[pair] = effective
        return changed

    def intent(self, step: Step) -> None:
        body = dict(step.args["body"])
        client_id = step.args.get("id")
        tag = str(step.args.get("tag", step.index))
        if client_id:
            body["id"] = client_id
            self.client_ids[tag] = client_id
        agent = str(step.args["target"])

        async def send() -> None:
            w = await self.recorder.write(
                agent,
                "POST",
                "/v1/intents",
                body,
                step=step.index,
                tag=tag,
                client_id=client_id,
                retry=bool(step.args.get("retry")),
            )
            if w["status"] in (201, 202) and isinstance(w["answer"], dict) and "id" in w["answer"]:
                self.acked[tag] = str(w["answer"]["id"])

        self.writes.append(asyncio.create_task(send()))

    def delete(self, step: Step) -> str | None:
        tag = str(step.args["tag"])
        intent_id = self.acked.get(tag) or self.client_ids.get(tag)
        if intent_id is None:
            return f"intent {tag} was never acknowledged: nothing to delete"
        agent = str(step.args["target"])
        path = f"/v1/intents/{intent_id}?reason=chaos+cleanup+{tag}"

        async def send() -> None:
            await self.recorder.write(agent, "DELETE", path, None, step=step.index, tag=tag)

        self.writes.append(asyncio.create_task(send()))
        return None

    # -- the end ----------------------------------------------------------------------

    async def heal_all(self, index: int) -> None:
        """Everything back to normal, recorded as one step."""
        resolved: dict[str, Any] = {"resumed": sorted(self.paused)}
        for agent in sorted(self.paused):
            self.cluster.resume_agent(agent)
        self.paused.clear()
        if self.cluster.mesh is not None:
            self.cluster.mesh.heal_all()
        resolved["heal_links"] = True
        for region in self.schedule.shape.regions:
            await self.cluster.heal_region(region)
        resolved["backends"] = dict.fromkeys(probe_kinds(self.config), "up")
        stopped, started = [], []
        at = time.monotonic()
        for agent in sorted(self.clock_env):
            if await self.stop(agent, signal.SIGTERM):
                stopped.append(agent)
        self.clock_env.clear()
        if stopped:
            self.recorder.fault(index, 0, "heal_all", {}, {"stopped": stopped}, at=at)
        for agent in self.agents:
            if self.start(agent):
                started.append(agent)
        resolved["started"] = started
        self.recorder.fault(index, 0, "heal_all", {}, resolved)

    async def clear_intents(self, index: int) -> None:
        """Delete every standing intent, so that the converged weights are the base ones."""
        for _ in range(5):
            standing = await self.standing()
            if standing is None:
                await asyncio.sleep(1.0)
                continue
            if not standing:
                return
            for intent_id in standing:
                agent = self.agents[len(self.recorder.writes) % len(self.agents)]
                await self.recorder.write(
                    agent, "DELETE", f"/v1/intents/{intent_id}?reason=chaos+end", None, step=index, tag="end"
                )
        self.notes.append("standing intents could not all be cleared")

    async def standing(self) -> list[str] | None:
        for agent in self.agents:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with self.recorder.session.get(
                    self.cluster.agents[agent].url + "/v1/intents",
                    headers={"Authorization": f"Bearer {self.cluster.admin_token}"},
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as r:
                    if r.status == 200:
                        body = await r.json(content_type=None)
                        return [str(i["id"]) for i in body.get("intents", [])]
        return None

    async def converged(self, baseline: Mapping[str, Mapping[str, int]]) -> bool:
        ds = await self.cluster.decisions(self.agents)
        if not all(ds.values()):
            return False
        positions = {(d.get("epoch"), d["revision"]) for d in ds.values() if d}
        if len(positions) != 1:
            return False
        for d in ds.values():
            assert d is not None
            if d.get("stale") or d.get("panic") or d.get("shed_fraction"):
                return False
            if not all(d.get("features", {}).values()):
                return False
            for service, base in baseline.items():
                if {r: p["weight"] for r, p in d["services"][service].items()} != dict(base):
                    return False
        return True

    async def finals(self) -> dict[str, AgentFinal]:
        out = {}
        for agent in self.agents:
            out[agent] = await self.final_of(agent)
        return out

    async def final_of(self, agent: str) -> AgentFinal:
        url = self.cluster.agents[agent].url
        decisions: dict[str, float] = {}
        ids: set[str] = set()
        complete = False
        reachable = False
        headers = {"Authorization": f"Bearer {self.cluster.admin_token}"}
        timeout = aiohttp.ClientTimeout(total=3.0)
        before: float | None = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError):
            for _ in range(20):
                query = "limit=500" + (f"&before={before!r}" if before is not None else "")
                async with self.recorder.session.get(f"{url}/v1/history?{query}", timeout=timeout) as r:
                    body = await r.json(content_type=None)
                for e in body["entries"]:
                    if e["kind"] == "decision" and e.get("revision") is not None:
                        decisions.setdefault(str(e["revision"]), float(e["at"]))
                    if e.get("intent_id"):
                        ids.add(str(e["intent_id"]))
                before = body.get("next_before")
                if before is None:
                    complete = body.get("total", 0) < 1000
                    break
            async with self.recorder.session.get(f"{url}/v1/intents", headers=headers, timeout=timeout) as r:
                body = await r.json(content_type=None)
                ids.update(str(i["id"]) for i in body.get("intents", []))
            reachable = True
        return AgentFinal(
            reachable=reachable, decisions=decisions, intent_ids=sorted(ids), history_complete=complete
        )


async def run_schedule(seed: int, options: Options, log: Any = None) -> History:
    """Play the schedule of `seed` on a fresh cluster; the recorded history."""
    etcd: LocalEtcd | None = None
    cluster: LocalCluster | None = None
    recorder: Recorder | None = None
    say = log or (lambda _msg: None)
    try:
        endpoint = None
        if options.backend == "etcd":
            etcd = LocalEtcd((options.workdir / f"etcd-{seed}") if options.workdir else None)
            await etcd.start()
            endpoint = etcd.endpoint
        config = cluster_config(options.agents, options.backend, endpoint)
        shape = shape_of(config, options)
        schedule = generate(seed, shape)
        say(schedule.describe())
        cluster = LocalCluster(
            config,
            workdir=(options.workdir / f"seed-{seed}") if options.workdir else None,
            with_proxies=options.backend == "raft",
        )
        await cluster.start()
        started = time.monotonic()
        first = await cluster.wait_ready(READY_TIMEOUT_S)
        await cluster.settled(quiet_s=1.5, timeout_s=READY_TIMEOUT_S)
        first = await cluster.decision(shape.agents[0]) or first
        rest_by = time.monotonic() + READY_TIMEOUT_S
        while not at_rest(first):
            if time.monotonic() > rest_by:
                raise TimeoutError(f"no decision at rest {READY_TIMEOUT_S:g} s after start: {first}")
            await asyncio.sleep(0.2)
            first = await cluster.decision(shape.agents[0]) or first
        baseline = {s: {r: int(p["weight"]) for r, p in ps.items()} for s, ps in first["services"].items()}
        recorder = Recorder(
            {a: cluster.agents[a].url for a in shape.agents},
            cluster.admin_token,
            poll_interval_s=options.poll_interval_s,
        )
        await recorder.start()
        run = _Run(schedule, cluster, recorder, config)
        run.faults_from = time.monotonic()
        watchdog = asyncio.create_task(run.watch_exits())
        try:
            await run.play_all()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        end_index = len(schedule.steps)
        await run.heal_all(end_index)
        healed_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await cluster.wait_ready(READY_TIMEOUT_S)
        await run.clear_intents(end_index + 1)
        converged_at = None
        deadline = healed_at + options.quiet_max_s
        while time.monotonic() < deadline:
            if await run.converged(baseline):
                converged_at = converged_at or time.monotonic()
                if time.monotonic() - converged_at >= options.quiet_stable_s:
                    break
            else:
                converged_at = None
            await asyncio.sleep(0.2)
        # A last poll of every agent after the quiet period, then the end.
        await asyncio.sleep(options.poll_interval_s * 3)
        ended = time.monotonic()
        finals = await run.finals()
        await recorder.stop()
        events = f"watch events {recorder.watch_events}, staleness events {recorder.staleness_events}"
        notes = [*run.notes, events]
        return History(
            seed=seed,
            backend=options.backend,
            agents=list(shape.agents),
            regions=list(shape.regions),
            services=list(shape.services),
            schedule=schedule.to_json(),
            params=params_of(config),
            baseline=baseline,
            started=started,
            faults_from=run.faults_from,
            healed_at=healed_at,
            ended=ended,
            converged_at=converged_at,
            reads=recorder.reads,
            contents=recorder.contents,
            writes=recorder.writes,
            faults=recorder.faults,
            final=finals,
            truncated=recorder.truncated,
            notes=notes,
        )
    finally:
        if recorder is not None:
            await recorder.stop()
        if cluster is not None:
            await cluster.stop()
        if etcd is not None:
            await etcd.close()
