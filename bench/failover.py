"""How fast a dead region's traffic moves, stage by stage, next to Sentinel and HAProxy.

    python -m bench.failover --trials 20 [--probe-interval 0.5 --fall 2 --rise 2]
        [--agents 3|5] [--wan-delay-ms 0] [--scope service|region] [--fault refuse|503|blackhole]
        [--peers sentinel,haproxy] [--json FILE]

A real cluster (agent processes, simulated backends in this process). Each trial waits
until every agent serves the healthy decision, then stops one region's backend (the
`order` service, or with `--scope region` every service of it; the region rotates) and
times, from that instant:

- `detect_first`: the first observer's down observation (its `at`, the time of the
  probe that completed `fall` failures), read from /v1/observations every 50 ms;
- `detect_quorum`: the same for the observer that completed a majority;
- `committed`: `committed_at_unix` of the first decision revision with the region down;
- `served_all`: every agent serves that decision (each agent's /v1/decision polled
  every 20 ms);
- `client_all` (the total): a blocking-query client on every agent
  (`?index=N&wait=30s`, as a load balancer long-polls) has received it.

Then it heals the backend and times the recovery: the verdict back up (committed),
weight > 0 on every agent (after `recovery_hold_s`, which is policy) and the full base
weight back on every agent (after the ramp, also policy); `hold_overhead` is weight > 0
on every agent minus the verdict and the hold, i.e. what the mechanics add to the policy.

Peers, in the same run, trials interleaved with ours, same detection settings
(`bench/peers.py`): Redis Sentinel (1 master, 1 replica, 3 sentinels, quorum 2,
`down-after-milliseconds` = interval x fall): SIGKILL of the master -> first
`+switch-master`; HAProxy (`inter` = interval, `fall`, `rise`, `option httpchk`) in
front of three simulated backends: the same fault -> the server marked DOWN on the
stats socket (polled every 10 ms). Ratios are ours (`client_all`) / peer, per trial
and of the medians. `--peers none` runs ours alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    Processes,
    add_common_args,
    bench_config,
    execute,
    loadavg,
    machine,
    percentiles,
    print_table,
    ratio,
)
from bench.peers import FAULTS, HEALED, SERVER_NAMES, HaproxyPeer, SentinelPeer
from controlplane.testing.localcluster import LocalCluster

REGIONS = ("cn-east", "cn-south", "cn-north")
SERVICES = ("order", "inventory", "gateway")
STAGES = ("detect_first", "detect_quorum", "committed", "served_all", "client_all")
RECOVERY_STAGES = ("verdict_up", "weight_back_all", "full_weight_all", "hold_overhead")
STAGE_TIMEOUT_S = 60.0
POLL_S = 0.02
OBSERVATIONS_POLL_S = 0.05

Decision = dict[str, Any]
Check = Callable[[Decision], bool]


def down_in(decision: Decision, region: str, services: Sequence[str]) -> bool:
    return all(
        decision["services"][s][region]["state"] == "down" and decision["services"][s][region]["weight"] == 0
        for s in services
    )


def verdict_up(decision: Decision, region: str, services: Sequence[str]) -> bool:
    return all(decision["services"][s][region]["verdict"] == "up" for s in services)


def weight_back(decision: Decision, region: str, services: Sequence[str]) -> bool:
    return all(decision["services"][s][region]["weight"] > 0 for s in services)


def weights_of(decision: Decision) -> dict[str, dict[str, int]]:
    return {s: {r: p["weight"] for r, p in regions.items()} for s, regions in decision["services"].items()}


@dataclass
class Follower:
    """A blocking-query client on one agent, following milestones in order.

    `milestones` are checks met one after the other (recovery counts only after the
    fault was seen); `seen` records when each was first met, and on which decision.
    """

    url: str
    session: aiohttp.ClientSession
    milestones: list[tuple[str, Check]]
    index: int
    seen: dict[str, tuple[float, Decision]] = field(default_factory=dict)
    reached: dict[str, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reached = {name: asyncio.Event() for name, _ in self.milestones}

    async def run(self) -> None:
        step = 0
        while step < len(self.milestones):
            try:
                async with self.session.get(
                    f"{self.url}/v1/decision", params={"index": str(self.index), "wait": "30s"}
                ) as r:
                    body = await r.json(content_type=None)
                    at = time.time()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.sleep(0.05)  # the agent may be busy; keep trying
                continue
            if r.status != 200 or not isinstance(body, dict):
                await asyncio.sleep(0.05)
                continue
            self.index = max(self.index, int(body["revision"]))
            while step < len(self.milestones) and self.milestones[step][1](body):
                self.seen[self.milestones[step][0]] = (at, body)
                self.reached[self.milestones[step][0]].set()
                step += 1


@dataclass
class Poller:
    """Polls every agent's /v1/decision: when each agent first served a passing decision."""

    urls: dict[str, str]
    session: aiohttp.ClientSession
    check: Check
    interval_s: float = POLL_S
    seen: dict[str, float] = field(default_factory=dict)

    async def run(self) -> None:
        while len(self.seen) < len(self.urls):
            started = time.monotonic()
            await asyncio.gather(*(self._one(a, u) for a, u in self.urls.items() if a not in self.seen))
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _one(self, agent: str, url: str) -> None:
        try:
            async with self.session.get(f"{url}/v1/decision") as r:
                body = await r.json(content_type=None)
                at = time.time()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        if r.status == 200 and isinstance(body, dict) and self.check(body):
            self.seen.setdefault(agent, at)


async def observations(url: str, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """An agent's `/v1/observations` (empty when it does not answer)."""
    try:
        async with session.get(f"{url}/v1/observations") as r:
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    return list((body or {}).get("observations", []))


async def watch_observations(
    url: str,
    session: aiohttp.ClientSession,
    region: str,
    services: Sequence[str],
    after: float,
    out: dict[str, float],
) -> None:
    """For each observer, the `at` of its first down observation of (region, services) after `after`."""
    while True:
        for o in await observations(url, session):
            if o["region"] == region and o["service"] in services and not o["up"] and o["at"] >= after:
                key = f"{o['observer']}/{o['service']}"
                out[key] = min(out.get(key, o["at"]), o["at"])
        await asyncio.sleep(OBSERVATIONS_POLL_S)


def detection(
    found: dict[str, float], services: Sequence[str], quorum: int
) -> tuple[float | None, float | None]:
    """(first down observation of any service, the time every service had `quorum` of them)."""
    if not found:
        return None, None
    per_service: dict[str, list[float]] = {}
    for key, at in found.items():
        per_service.setdefault(key.rpartition("/")[2], []).append(at)
    quorum_at = [sorted(ts)[quorum - 1] for ts in per_service.values() if len(ts) >= quorum]
    return min(found.values()), max(quorum_at) if len(quorum_at) == len(services) else None


async def settle(cluster: LocalCluster, base: dict[str, dict[str, int]], timeout_s: float = 120.0) -> int:
    """Every agent serves the healthy decision with the base weights; its revision."""

    async def healthy() -> int | None:
        ds = await cluster.decisions(list(cluster.agents))
        if all(d is not None and weights_of(d) == base for d in ds.values()):
            revisions = {int(d["revision"]) for d in ds.values() if d}
            if len(revisions) == 1:
                return revisions.pop()
        return None

    revision: int = await cluster.wait_for(healthy, timeout_s, "every agent back at the base weights", 0.1)
    return revision


async def our_trial(
    cluster: LocalCluster,
    session: aiohttp.ClientSession,
    base: dict[str, dict[str, int]],
    region: str,
    services: Sequence[str],
    fault: str,
    hold_s: float,
    interval_s: float,
) -> dict[str, Any]:
    revision = await settle(cluster, base)
    urls = {a.id: a.url for a in cluster.agents.values()}
    quorum = len(urls) // 2 + 1

    def full(d: Decision) -> bool:
        return all(d["services"][s][region]["weight"] == base[s][region] for s in services)

    milestones: list[tuple[str, Check]] = [
        ("down", lambda d: down_in(d, region, services)),
        ("verdict_up", lambda d: verdict_up(d, region, services)),
        ("weight_back", lambda d: weight_back(d, region, services)),
        ("full", full),
    ]
    followers = {agent: Follower(url, session, milestones, revision) for agent, url in urls.items()}
    poller = Poller(urls, session, lambda d: down_in(d, region, services))
    found: dict[str, float] = {}
    await asyncio.sleep(random.uniform(0, interval_s))  # no fixed phase against the probes
    t_fault = time.time()
    tasks = [asyncio.create_task(f.run()) for f in followers.values()]
    obs_task = asyncio.create_task(
        watch_observations(next(iter(urls.values())), session, region, services, t_fault, found)
    )
    poll_task = asyncio.create_task(poller.run())
    try:
        for s in services:
            await cluster.set_backend(region, s, **FAULTS[fault])
        async with asyncio.timeout(STAGE_TIMEOUT_S):
            await asyncio.gather(poll_task, *(f.reached["down"].wait() for f in followers.values()))
        await asyncio.sleep(0.1)  # the observation poller catches up
        obs_task.cancel()
        downs = [f.seen["down"] for f in followers.values()]
        first_down = min((d for _, d in downs), key=lambda d: int(d["revision"]))
        first_seen, quorum_seen = detection(found, services, quorum)
        stages = {
            "detect_first": None if first_seen is None else first_seen - t_fault,
            "detect_quorum": None if quorum_seen is None else quorum_seen - t_fault,
            "committed": float(first_down["committed_at_unix"]) - t_fault,
            "served_all": max(poller.seen.values()) - t_fault,
            "client_all": max(at for at, _ in downs) - t_fault,
        }
        # Recovery.
        t_heal = time.time()
        for s in services:
            await cluster.set_backend(region, s, **HEALED)
        async with asyncio.timeout(STAGE_TIMEOUT_S + hold_s):
            await asyncio.gather(*tasks)
        ups = [f.seen["verdict_up"][1] for f in followers.values()]
        first_up = min(ups, key=lambda d: int(d["revision"]))
        weight_back_all = max(f.seen["weight_back"][0] for f in followers.values()) - t_heal
        verdict_up_s = float(first_up["committed_at_unix"]) - t_heal
        recovery = {
            "verdict_up": verdict_up_s,
            "weight_back_all": weight_back_all,
            "full_weight_all": max(f.seen["full"][0] for f in followers.values()) - t_heal,
            "hold_overhead": weight_back_all - verdict_up_s - hold_s,
        }
    finally:
        for task in (*tasks, obs_task, poll_task):
            task.cancel()
        await asyncio.gather(*tasks, obs_task, poll_task, return_exceptions=True)
    return {
        "region": region,
        "services": list(services),
        "revision_down": int(first_down["revision"]),
        "observers_down": len({k.rpartition("/")[0] for k in found}),
        "stages_s": {k: None if v is None else round(v, 4) for k, v in stages.items()},
        "recovery_s": {k: round(v, 4) for k, v in recovery.items()},
        "total_s": round(stages["client_all"] or 0.0, 4),
    }


def stage_table(title: str, trials: list[dict[str, Any]], key: str, stages: Sequence[str]) -> dict[str, Any]:
    summary = {s: percentiles(t[key][s] for t in trials if t[key][s] is not None) for s in stages}
    print(f"\n{title}")
    print_table(
        ["stage (s)", "n", "p50", "p95", "p99", "max"],
        [
            [s, summary[s]["n"], summary[s]["p50"], summary[s]["p95"], summary[s]["p99"], summary[s]["max"]]
            for s in stages
        ],
    )
    return summary


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    for p in peers:
        if p not in ("sentinel", "haproxy"):
            raise SystemExit(f"--peers: unknown peer {p!r} (sentinel, haproxy, none)")
    services = list(SERVICES) if args.scope == "region" else ["order"]
    config = bench_config(
        agents=args.agents,
        interval_s=args.probe_interval,
        fall=args.fall,
        rise=args.rise,
        policy={"recovery_hold_s": args.recovery_hold_s, "ramp_step_s": args.ramp_step_s},
    )
    probes = config["probes"]
    procs = Processes(workdir)
    sentinel = haproxy = None
    ours: list[dict[str, Any]] = []
    sentinel_trials: list[dict[str, Any]] = []
    haproxy_trials: list[dict[str, Any]] = []
    load_before = loadavg()
    measured = machine()  # at the start: the commit the agents run
    started = time.monotonic()
    try:
        if "sentinel" in peers:
            sentinel = SentinelPeer(procs, down_after_ms=round(args.probe_interval * args.fall * 1000))
            await sentinel.start()
        if "haproxy" in peers:
            haproxy = HaproxyPeer(procs, args.probe_interval, args.fall, args.rise, probes["timeout_s"])
            await haproxy.start()
        async with LocalCluster(
            config, workdir=workdir / "cluster", with_proxies=args.wan_delay_ms > 0
        ) as cluster:
            await cluster.wait_ready(90)
            if args.wan_delay_ms > 0:
                assert cluster.mesh is not None
                cluster.mesh.set_delay_ms(args.wan_delay_ms)
                await cluster.wait_ready(90)
            base = weights_of(await cluster.wait_ready(30))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
                for i in range(args.trials):
                    region = REGIONS[i % len(REGIONS)]
                    trial = await our_trial(
                        cluster,
                        session,
                        base,
                        region,
                        services,
                        args.fault,
                        args.recovery_hold_s,
                        args.probe_interval,
                    )
                    trial["trial"] = i
                    ours.append(trial)
                    line = f"trial {i}: ours {trial['total_s']:.3f} s ({region})"
                    if sentinel is not None:
                        s = await sentinel.trial()
                        s["trial"] = i
                        sentinel_trials.append(s)
                        line += f"  sentinel {s['total_s']:.3f} s"
                    if haproxy is not None:
                        h = await haproxy.trial(SERVER_NAMES[i % len(SERVER_NAMES)], args.fault)
                        h["trial"] = i
                        haproxy_trials.append(h)
                        line += f"  haproxy {h['total_s']:.3f} s"
                    print(line, flush=True)
    finally:
        if sentinel is not None:
            await sentinel.stop()
        if haproxy is not None:
            await haproxy.stop()
        procs.stop_all()
    elapsed = time.monotonic() - started

    budget = args.probe_interval * args.fall + 0.5
    result: dict[str, Any] = {
        "benchmark": "failover",
        "settings": {
            "trials": args.trials,
            "agents": args.agents,
            "probe_interval_s": args.probe_interval,
            "probe_timeout_s": probes["timeout_s"],
            "fall": args.fall,
            "rise": args.rise,
            "wan_delay_ms": args.wan_delay_ms,
            "scope": args.scope,
            "services": services,
            "fault": args.fault,
            "recovery_hold_s": args.recovery_hold_s,
            "ramp_step_s": args.ramp_step_s,
            "ramp_steps": config["policy"]["ramp_steps"],
            "peers": peers,
        },
        "machine": measured,
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_wait": args.quiet_wait,
        "elapsed_s": round(elapsed, 1),
        "trials": {"ours": ours, "sentinel": sentinel_trials, "haproxy": haproxy_trials},
    }
    summary: dict[str, Any] = {
        "ours": stage_table("ours: fault -> ...", ours, "stages_s", STAGES),
        "recovery": stage_table(
            f"ours: heal -> ... (policy: hold {args.recovery_hold_s} s, "
            f"ramp steps every {args.ramp_step_s} s)",
            ours,
            "recovery_s",
            RECOVERY_STAGES,
        ),
    }
    peer_rows = [["ours (client_all)", *pick(percentiles(t["total_s"] for t in ours))]]
    ratios: dict[str, Any] = {}
    for name, trials, stages in (
        ("sentinel", sentinel_trials, ("sdown_s", "odown_s", "switch_master_first_s", "switch_master_all_s")),
        ("haproxy", haproxy_trials, ("total_s", "recovery_s")),
    ):
        if not trials:
            continue
        summary[name] = {s: percentiles(t[s] for t in trials if t.get(s) is not None) for s in stages}
        summary[name]["total_s"] = percentiles(t["total_s"] for t in trials)
        peer_rows.append([f"{name} (total)", *pick(summary[name]["total_s"])])
        per_trial = [ratio(o["total_s"], p["total_s"]) for o, p in zip(ours, trials, strict=False)]
        ratios[name] = {
            "per_trial": per_trial,
            "median_of_ratios": round(statistics.median(r for r in per_trial if r is not None), 2),
            "ratio_of_medians": ratio(summary["ours"]["client_all"]["p50"], summary[name]["total_s"]["p50"]),
            "target": 1.0 if name == "sentinel" else 1.3,
        }
    print("\nside by side (s)")
    print_table(["", "n", "p50", "p95", "p99", "max"], peer_rows)
    for name, r in ratios.items():
        print(
            f"ours/{name}: median of per-trial ratios {r['median_of_ratios']}, "
            f"ratio of medians {r['ratio_of_medians']} (target <= {r['target']})"
        )
    p99 = summary["ours"]["client_all"]["p99"]
    result["summary"] = summary
    result["ratios"] = ratios
    result["targets"] = {
        "total_p99_s": p99,
        "total_p99_target_s": round(budget, 3),
        "total_p99_met": p99 is not None and p99 <= budget,
        "ours_over_sentinel_met": ratios["sentinel"]["ratio_of_medians"] <= 1.0
        if "sentinel" in ratios
        else None,
        "ours_over_haproxy_met": ratios["haproxy"]["ratio_of_medians"] <= 1.3
        if "haproxy" in ratios
        else None,
    }
    print(f"total p99 {p99} s vs target {budget:.3f} s (interval x fall + 0.5 s); load {loadavg()}")
    return result


def pick(p: dict[str, Any]) -> list[Any]:
    return [p["n"], p["p50"], p["p95"], p["p99"], p["max"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument(
        "--probe-interval", type=float, default=0.5, help="probe interval (s), also HAProxy inter"
    )
    ap.add_argument("--fall", type=int, default=2)
    ap.add_argument("--rise", type=int, default=2)
    ap.add_argument("--agents", type=int, choices=(3, 5), default=3)
    ap.add_argument("--wan-delay-ms", type=float, default=0.0, help="delay each way between agents")
    ap.add_argument("--scope", choices=("service", "region"), default="service")
    ap.add_argument("--fault", choices=sorted(FAULTS), default="refuse")
    ap.add_argument("--recovery-hold-s", type=float, default=2.0)
    ap.add_argument("--ramp-step-s", type=float, default=1.0)
    ap.add_argument("--peers", default="sentinel,haproxy", help="comma-separated: sentinel, haproxy, or none")
    add_common_args(ap)
    args = ap.parse_args()
    execute("failover", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
