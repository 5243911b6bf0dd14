"""A whole region black-holed: its backends AND its agent cut off, half the time the leader.

    python -m bench.blackhole --trials 20 [--agents 3|5] [--probe-interval 0.5 --fall 2] [--json FILE]

The worst ordinary outage for this design: the region that fails takes its agent with it,
and that agent may be the Raft leader, so the survivors must elect a new leader, decide
and serve, all within the failover budget. Each trial waits until every agent serves the
healthy decision (and, on even trials, until the region's own agent leads: pausing other
leaders until it wins), then at one instant black-holes every backend of the region
(connections accepted, never answered; the TCP-probed gateway's refused, since a connect
probe passes a server that accepts and hangs) and the region's agent's Raft links (the
fault proxy swallows them), and times, on every surviving agent, a blocking-query client
(`?index=N&wait=30s`, as a load balancer long-polls) receiving a decision with the region
down in every service:

- `client_all`: fault -> the last survivor's client has it (the total);
- `committed`: fault -> the `committed_at` of that decision (cluster time, taken as wall);
- `detection_window`: `fall x interval + timeout`, the least a probe-based detection can
  take; the target is `client_all` p99 <= detection window + 1 s.

Then it heals (the proxy and the backends) and waits for the base weights everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import add_common_args, bench_config, execute, loadavg, machine, percentiles, print_table
from bench.failover import Follower, down_in, observations, settle, weights_of
from bench.peers import FAULTS
from controlplane.testing.localcluster import LocalCluster

REGIONS = ("cn-east", "cn-south", "cn-north")
SERVICES = ("order", "inventory", "gateway")
# The HTTP services' backends accept connections and never answer; the gateway's, probed
# with a TCP connect (which a server that accepts and hangs passes), refuses them.
FAULT_OF = {"order": "blackhole", "inventory": "blackhole", "gateway": "refuse"}
STAGE_TIMEOUT_S = 60.0
TRACE_POLL_S = 0.05


async def trace_observations(
    url: str, session: aiohttp.ClientSession, region: str, t0: float, out: list[dict[str, Any]]
) -> None:
    """Every change of an observation of `region`, as replicated (seen on `url`), times from `t0`.

    What a slow trial is read from: when each observer's view of each service turned,
    whether it was inconclusive or impaired, and when it reached the store.
    """
    last: dict[str, tuple[Any, ...]] = {}
    while True:
        views = await observations(url, session)
        seen = round(time.time() - t0, 3)
        for o in views:
            if o["region"] != region:
                continue
            key = f"{o['observer']}/{o['service']}"
            view = (o["up"], o.get("inconclusive"), o.get("impaired"), o.get("error"))
            if last.get(key) != view:
                last[key] = view
                out.append(
                    {
                        "seen": seen,
                        "key": key,
                        "up": o["up"],
                        "at": round(o["at"] - t0, 3),
                        "inconclusive": o.get("inconclusive"),
                        "impaired": o.get("impaired"),
                        "error": o.get("error"),
                    }
                )
        await asyncio.sleep(TRACE_POLL_S)


async def leader_of(cluster: LocalCluster) -> str:
    return await cluster.wait_leader(60.0)


async def make_leader(cluster: LocalCluster, agent_id: str, tries: int = 12) -> bool:
    """Pause other leaders until `agent_id` wins an election; False if it never does."""
    for _ in range(tries):
        leader = await leader_of(cluster)
        if leader == agent_id:
            return True
        cluster.kill_agent(leader, signal.SIGSTOP, wait=False)
        try:
            await cluster.wait_leader(60.0, exclude=[leader])
        finally:
            cluster.kill_agent(leader, signal.SIGCONT, wait=False)
        await cluster.wait_ready(60.0)
    return False


async def wait_witnesses(url: str, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> float:
    """Until no observer's view is impaired or inconclusive; the seconds it took.

    Moving leadership pauses agents (SIGSTOP), and an agent resumed from a pause rightly
    calls its own probes impaired for a while (`probes.timing`): an impaired observer is
    no witness, so a fault inside that window is a compound fault (a region failing right
    after another agent froze), detected later by design. A trial starts from steady state.
    """
    start = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            views = await observations(url, session)
            steady = all(o["fresh"] and not o.get("impaired") and not o.get("inconclusive") for o in views)
            if views and steady:
                return time.monotonic() - start
            await asyncio.sleep(TRACE_POLL_S)


async def trial(
    cluster: LocalCluster,
    session: aiohttp.ClientSession,
    base: dict[str, dict[str, int]],
    region: str,
    want_leader: bool,
    interval_s: float,
) -> dict[str, Any]:
    assert cluster.mesh is not None
    victim = next(a.id for a in cluster.agents.values() if a.region == region)
    await settle(cluster, base)
    if want_leader:
        await make_leader(cluster, victim)
    elif await leader_of(cluster) == victim:
        # A follower trial: hand leadership to another agent first.
        other = next(a.id for a in cluster.agents.values() if a.id != victim)
        await make_leader(cluster, other)
    was_leader = await leader_of(cluster) == victim
    survivors = {a.id: a.url for a in cluster.agents.values() if a.id != victim}
    waited_s = await wait_witnesses(next(iter(survivors.values())), session)
    if (await leader_of(cluster) == victim) != was_leader:
        raise RuntimeError("leadership moved while waiting for steady state")
    revision = await settle(cluster, base)
    followers = {
        agent: Follower(url, session, [("down", lambda d: down_in(d, region, SERVICES))], revision)
        for agent, url in survivors.items()
    }
    await asyncio.sleep(random.uniform(0, interval_s))  # no fixed phase against the probes
    t_fault = time.time()
    trace: list[dict[str, Any]] = []
    witness = next(iter(survivors.values()))
    tracer = asyncio.create_task(trace_observations(witness, session, region, t_fault, trace))
    tasks = [asyncio.create_task(f.run()) for f in followers.values()]
    try:
        cluster.mesh.isolate(victim, "blackhole")
        for s in SERVICES:
            await cluster.set_backend(region, s, **FAULTS[FAULT_OF[s]])
        async with asyncio.timeout(STAGE_TIMEOUT_S):
            await asyncio.gather(*tasks)
        downs = [f.seen["down"] for f in followers.values()]
        first = min((d for _, d in downs), key=lambda d: int(d["revision"]))
        result = {
            "region": region,
            "victim_was_leader": was_leader,
            "waited_for_witnesses_s": round(waited_s, 3),
            "client_all": round(max(at for at, _ in downs) - t_fault, 4),
            "committed": round(float(first["committed_at_unix"]) - t_fault, 4),
            "reasons": [r for r in first.get("reasons", []) if region in r],
            "trace": trace,
        }
    finally:
        for task in [*tasks, tracer]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cluster.mesh.heal_all()
        await cluster.heal_region(region)
    return result


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = bench_config(
        agents=args.agents,
        interval_s=args.probe_interval,
        fall=args.fall,
        policy={"recovery_hold_s": 1.0, "ramp_step_s": 0.5},
    )
    probes = config["probes"]
    window = probes["fall"] * probes["interval_s"] + probes["timeout_s"]
    results: list[dict[str, Any]] = []
    async with LocalCluster(config, workdir=workdir / "cluster", with_proxies=True) as cluster:
        await cluster.wait_ready(120.0)
        base = weights_of(await cluster.decision(next(iter(cluster.agents))) or {})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
            for i in range(args.trials):
                region = REGIONS[i % len(REGIONS)]
                one = await trial(cluster, session, base, region, i % 2 == 0, probes["interval_s"])
                results.append(one)
                print(
                    f"trial {i + 1}/{args.trials}: {region} (leader: {one['victim_was_leader']}) "
                    f"-> every survivor's client {one['client_all']:.3f} s",
                    flush=True,
                )
                if one["client_all"] > window + 1.0:
                    for t in one["trace"]:
                        print(f"    {t}", flush=True)
                    for r in one["reasons"]:
                        print(f"    reason: {r}", flush=True)
    summary = {
        "all": percentiles(r["client_all"] for r in results),
        "victim_leader": percentiles(r["client_all"] for r in results if r["victim_was_leader"]),
        "victim_follower": percentiles(r["client_all"] for r in results if not r["victim_was_leader"]),
        "committed": percentiles(r["committed"] for r in results),
    }
    print(f"\nregion black-hole, {args.agents} agents, detection window {window:.2f} s")
    print_table(
        ["trials", "n", "p50", "p95", "p99", "max"],
        [[k, v["n"], v["p50"], v["p95"], v["p99"], v["max"]] for k, v in summary.items()],
    )
    p99 = summary["all"]["p99"]
    target = window + 1.0
    print(f"target: p99 <= detection window + 1 s = {target:.2f} s: {'met' if p99 <= target else 'MISSED'}")
    return {
        "benchmark": "blackhole",
        "machine": machine(),
        "load": loadavg(),
        "agents": args.agents,
        "detection_window_s": window,
        "target_s": target,
        "summary": summary,
        "trials": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--agents", type=int, choices=(3, 5), default=3)
    ap.add_argument("--probe-interval", type=float, default=0.5)
    ap.add_argument("--fall", type=int, default=2)
    add_common_args(ap)
    execute("blackhole", ap.parse_args(), run)


if __name__ == "__main__":
    main()
