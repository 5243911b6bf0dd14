"""What an agent costs at scale: 5 agents probing 20 regions x 10 services every second.

    python -m bench.scale [--regions 20 --services 10 --agents 5] [--quiet-s 60]
        [--intents 30] [--trials 5] [--ttl-s 6] [--no-baseline] [--json FILE]

A real cluster (agent processes, one simulated backend per (region, service) in this
process) with a generated config: N regions (`rg-00` ...) x M services (`svc-0` ...),
K agents, one in each of the first K regions; probes every 1 s, timeout 0.8 s, fall 2,
rise 2 (every third service a TCP connect probe, the others HTTP); every region the
same capacity, and demand per service 75 % of what N - 1 regions serve, so losing one
region needs no shedding. Three phases:

1. *Quiet* (`--quiet-s`, nothing changes): per agent, CPU share (from /proc), RSS,
   observations published per second and probes per second (its /metrics), and its Raft
   traffic: bytes and TCP data segments per second, in and out, summed over the agent's
   Raft sockets from the kernel's own counters (`ss -tin`: `bytes_acked`,
   `bytes_received`, `data_segs_out`, `data_segs_in`). The agents count no Raft bytes or
   messages themselves (the engine's `counters` hold proposals and applied entries and
   are not exported), so data segments stand in for messages: a segment carries one or
   more frames, keepalives (one per link every 0.5 s) included. Also the commit rate
   (the leader's commit index per second), the decisions committed, and this harness's
   own CPU (it serves every backend) and the whole machine's.
2. *Commit latency*: `--intents` feature intents (a switch off and on, alternating),
   POSTed one after another to the agents in turn; POST -> answered (201: committed and
   served by that agent).
3. *Failover*: `--trials` of one pair down (one service's backend in one region refusing
   connections) and as many of a whole region down (every service of it), interleaved;
   each from steady state (every agent at the base weights), timed fault -> every
   agent's blocking-query client (`?index=N&wait=30s`) has a decision with the pair (or
   every pair of the region) down; healed and settled between trials. Target: p99 <=
   detection window (fall x interval + timeout) + 0.5 s.

With `--baseline` (the default) the same quiet phase and commit latency are measured
on the 3-region demo deployment (3 agents, 3 x 3 pairs) with the same probe settings,
after the large cluster has stopped, so the README can put them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    ProcStats,
    add_common_args,
    bench_config,
    cpu_percent,
    execute,
    loadavg,
    machine,
    percentiles,
    print_table,
)
from bench.failover import Follower, down_in, settle, weights_of
from bench.peers import FAULTS
from controlplane.testing.localcluster import LocalCluster, load_demo_config
from controlplane.testing.ports import free_port

INTERVAL_S = 1.0
TIMEOUT_S = 0.8
FALL = 2
RISE = 2
CAPACITY_RPS = 1000.0
DEMAND_SHARE = 0.75  # of what N - 1 regions serve: losing one region sheds nothing
CPU_TARGET_PERCENT = 25.0
FAILOVER_MARGIN_S = 0.5
STAGE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 180.0
METRICS = {
    "controlplane_observations_published_total": "observations_published",
    "controlplane_probe_duration_seconds_count": "probes",
    "controlplane_probe_failures_total": "probe_failures",
    "controlplane_probe_inconclusive_total": "probes_inconclusive",
    "controlplane_decisions_committed_total": "decisions_committed",
}
RAFT_FIELDS = ("bytes_acked", "bytes_received", "data_segs_out", "data_segs_in")


# -- the deployment ---------------------------------------------------------------------


def region_names(n: int) -> list[str]:
    return [f"rg-{i:02d}" for i in range(n)]


def service_names(m: int) -> list[str]:
    return [f"svc-{i}" for i in range(m)]


def scale_config(regions: int, services: int, agents: int, ttl_s: float) -> dict[str, Any]:
    """N regions x M services, K agents in the first K regions, every port free."""
    if not 3 <= agents <= regions:
        raise SystemExit(f"--agents must be between 3 and --regions (got {agents} agents, {regions} regions)")
    demo = load_demo_config()
    taken: set[int] = set()

    def port() -> int:
        p = free_port(exclude=taken)
        taken.add(p)
        return p

    names = region_names(regions)
    cluster_agents = [
        {
            "id": f"agent-{i:02d}",
            "region": names[i],
            "raft": f"127.0.0.1:{port()}",
            "http": f"127.0.0.1:{port()}",
        }
        for i in range(agents)
    ]
    region_configs: dict[str, Any] = {}
    for name in names:
        svcs: dict[str, Any] = {}
        for j, svc in enumerate(service_names(services)):
            p = port()
            target = f"tcp://127.0.0.1:{p}" if j % 3 == 2 else f"http://127.0.0.1:{p}/healthz"
            svcs[svc] = {"targets": [target]}
        region_configs[name] = {"capacity_rps": CAPACITY_RPS, "services": svcs}
    demand = round(DEMAND_SHARE * CAPACITY_RPS * (regions - 1))
    return {
        "cluster": {**demo["cluster"], "name": "scale", "agents": cluster_agents},
        "regions": region_configs,
        "probes": {"interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S, "rise": RISE, "fall": FALL},
        "policy": {
            **demo["policy"],
            "observation_ttl_s": ttl_s,
            "recovery_hold_s": 1.0,
            "ramp_step_s": 0.5,
            # Above the probes' latency on a loaded 2-core machine, below the timeout:
            # gray-failure verdicts flapping would be changes in the quiet phase.
            "slow_ms": 600,
            "demand_rps": dict.fromkeys(service_names(services), demand),
        },
        "features": demo["features"],
        "auth": demo["auth"],
        "backend": demo["backend"],
        "data_dir": "./data",
    }


def baseline_config(ttl_s: float) -> dict[str, Any]:
    """The 3-region demo deployment with the same probe settings as the scale run."""
    config = bench_config(
        agents=3,
        interval_s=INTERVAL_S,
        fall=FALL,
        rise=RISE,
        policy={"observation_ttl_s": ttl_s, "recovery_hold_s": 1.0, "ramp_step_s": 0.5, "slow_ms": 600},
    )
    config["probes"]["timeout_s"] = TIMEOUT_S
    return config


# -- what the quiet phase reads ---------------------------------------------------------


async def agent_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The counters in `METRICS`, summed over their labels (0 when the agent does not answer)."""
    out = dict.fromkeys(METRICS.values(), 0.0)
    try:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return out
    for line in text.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name in METRICS:
            out[METRICS[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def cluster_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    try:
        async with session.get(url + "/v1/cluster") as r:
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


_SOCKET = re.compile(r"^\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)\s+(.*)$")
_PID = re.compile(r"pid=(\d+)")
_FIELD = re.compile(r"\b(bytes_acked|bytes_received|data_segs_out|data_segs_in):(\d+)")


async def raft_sockets(raft_ports: set[int], pids: set[int]) -> dict[tuple[int, int, int], dict[str, int]]:
    """The agents' established Raft connections, from the kernel: (pid, local, peer port) -> counters."""
    proc = await asyncio.create_subprocess_exec(
        "ss",
        "-tinpH",
        "state",
        "established",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    found: dict[tuple[int, int, int], dict[str, int]] = {}
    key: tuple[int, int, int] | None = None
    for line in out.decode(errors="replace").splitlines():
        if not line.startswith(("\t", " ")):
            key = None
            m = _SOCKET.match(line)
            if m is None or m.group(1) != "127.0.0.1" or m.group(3) != "127.0.0.1":
                continue
            local, peer = int(m.group(2)), int(m.group(4))
            owner = _PID.search(m.group(5))
            if owner is None or int(owner.group(1)) not in pids:
                continue
            if local in raft_ports or peer in raft_ports:
                key = (int(owner.group(1)), local, peer)
        elif key is not None:
            found[key] = {name: int(value) for name, value in _FIELD.findall(line)}
            key = None
    return found


def raft_traffic(
    before: Mapping[tuple[int, int, int], Mapping[str, int]],
    after: Mapping[tuple[int, int, int], Mapping[str, int]],
    pid: int,
    seconds: float,
) -> dict[str, Any]:
    """One agent's Raft traffic per second over its sockets (new sockets counted whole)."""
    total = dict.fromkeys(RAFT_FIELDS, 0)
    sockets = 0
    for key, counters in after.items():
        if key[0] != pid:
            continue
        sockets += 1
        start = before.get(key, {})
        for f in RAFT_FIELDS:
            total[f] += counters.get(f, 0) - start.get(f, 0)
    return {
        "sockets": sockets,
        "bytes_out_per_s": round(total["bytes_acked"] / seconds),
        "bytes_in_per_s": round(total["bytes_received"] / seconds),
        "segments_out_per_s": round(total["data_segs_out"] / seconds, 1),
        "segments_in_per_s": round(total["data_segs_in"] / seconds, 1),
    }


async def decisions_between(session: aiohttp.ClientSession, url: str, first: int, last: int) -> list[str]:
    """What the decisions after `first` up to `last` said (the history's summaries, oldest first)."""
    try:
        async with session.get(url + "/v1/history", params={"limit": "50"}) as r:
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    entries = body.get("entries", []) if isinstance(body, dict) else []
    return [
        f"r{e['revision']}: {e['summary']}"
        for e in reversed(entries)
        if e.get("kind") == "decision" and first < (e.get("revision") or 0) <= last
    ]


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


async def quiet_phase(
    cluster: LocalCluster, session: aiohttp.ClientSession, quiet_s: float, pairs: int
) -> dict[str, Any]:
    """Every agent's cost over `quiet_s` in which nothing changes."""
    agents = {a.id: a for a in cluster.agents.values()}
    assert all(a.proc is not None for a in agents.values())
    pids = {a.id: a.proc.pid for a in agents.values() if a.proc is not None}
    stats = {i: ProcStats(pid) for i, pid in pids.items()}
    harness = ProcStats(os.getpid())
    raft_ports = {int(a.raft.rpartition(":")[2]) for a in agents.values()}
    leader = await cluster.wait_leader(60.0)

    async def snapshot() -> dict[str, Any]:
        metrics = await asyncio.gather(*(agent_metrics(session, a.url) for a in agents.values()))
        status = await cluster_status(session, agents[leader].url)
        return {
            "proc": {i: s.sample() for i, s in stats.items()},
            "harness": harness.sample(),
            "machine": machine_busy(),
            "metrics": dict(zip(agents, metrics, strict=True)),
            "commit_index": int(status.get("commit_index") or 0),
            "revision": int(status.get("revision") or 0),
            "leader": status.get("leader"),
            "raft": await raft_sockets(raft_ports, set(pids.values())),
            "at": time.monotonic(),
        }

    before = await snapshot()
    await asyncio.sleep(quiet_s)
    after = await snapshot()
    seconds = after["at"] - before["at"]
    per_agent: dict[str, Any] = {}
    for i, a in agents.items():
        m0, m1 = before["metrics"][i], after["metrics"][i]
        rate = {k: round((m1[k] - m0[k]) / seconds, 2) for k in METRICS.values()}
        p1 = after["proc"][i]
        per_agent[i] = {
            "region": a.region,
            "leader": i == leader,
            "cpu_percent": cpu_percent(before["proc"][i], p1),
            "rss_mb": round(p1.rss_bytes / 2**20, 1),
            "threads": p1.threads,
            "fds": p1.fds,
            **{f"{k}_per_s": v for k, v in rate.items()},
            "raft": raft_traffic(before["raft"], after["raft"], pids[i], seconds),
        }
    changes = await decisions_between(session, agents[leader].url, before["revision"], after["revision"])
    busy0, total0 = before["machine"]
    busy1, total1 = after["machine"]
    cpus = [p["cpu_percent"] for p in per_agent.values()]
    published = sum(p["observations_published_per_s"] for p in per_agent.values())
    leader_raft = per_agent[leader]["raft"]
    return {
        "seconds": round(seconds, 1),
        "agents": per_agent,
        "leader": leader,
        "leadership_stable": before["leader"] == after["leader"] == leader,
        "commits_per_s": round((after["commit_index"] - before["commit_index"]) / seconds, 2),
        "decisions": after["revision"] - before["revision"],
        "decision_summaries": changes,
        "observations_published_per_s": round(published, 1),
        "pairs": pairs,
        "leader_raft_bytes_out_per_s": leader_raft["bytes_out_per_s"],
        "raft_bytes_out_per_s_all": sum(p["raft"]["bytes_out_per_s"] for p in per_agent.values()),
        "leader_bytes_per_observation": round(leader_raft["bytes_out_per_s"] / published)
        if published
        else None,
        "cpu_percent_max": max(cpus),
        "cpu_percent_mean": round(sum(cpus) / len(cpus), 1),
        "rss_mb_max": max(p["rss_mb"] for p in per_agent.values()),
        "harness_cpu_percent": cpu_percent(before["harness"], after["harness"]),
        "machine_busy_percent": round(100.0 * (busy1 - busy0) / max(1.0, total1 - total0), 1),
        "loadavg": loadavg(),
    }


def print_quiet(title: str, q: Mapping[str, Any]) -> None:
    print(f"\n{title}: quiet {q['seconds']} s, leader {q['leader']}")
    print_table(
        ["agent", "cpu %", "rss MB", "obs pub/s", "probes/s", "raft out B/s", "in B/s", "segs out/s", "in/s"],
        [
            [
                i + (" (L)" if p["leader"] else ""),
                p["cpu_percent"],
                p["rss_mb"],
                p["observations_published_per_s"],
                p["probes_per_s"],
                p["raft"]["bytes_out_per_s"],
                p["raft"]["bytes_in_per_s"],
                p["raft"]["segments_out_per_s"],
                p["raft"]["segments_in_per_s"],
            ]
            for i, p in q["agents"].items()
        ],
    )
    print(
        f"commits/s {q['commits_per_s']}, decisions {q['decisions']}, observations published/s "
        f"{q['observations_published_per_s']}, leader bytes/observation {q['leader_bytes_per_observation']}; "
        f"harness {q['harness_cpu_percent']} % of a core, machine {q['machine_busy_percent']} % busy"
    )
    for line in q["decision_summaries"]:
        print(f"    {line}")


# -- commit latency ----------------------------------------------------------------------


async def commit_latency(cluster: LocalCluster, count: int) -> dict[str, Any]:
    """`count` feature intents POSTed in turn to every agent; seconds from POST to answer."""
    ids = list(cluster.agents)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for n in range(count):
        body = {
            "kind": "feature",
            "name": "comments",
            "enabled": n % 2 == 1 or n == count - 1,  # off, on, ...; left on
            "reason": "bench.scale commit latency",
        }
        started = time.perf_counter()
        status, _ = await cluster.post(ids[n % len(ids)], "/v1/intents", body)
        elapsed = time.perf_counter() - started
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status in (201, 202):
            latencies.append(elapsed * 1000)
    return {"latency_ms": percentiles(latencies, 1), "statuses": statuses}


# -- failover ----------------------------------------------------------------------------


async def failover_trial(
    cluster: LocalCluster,
    session: aiohttp.ClientSession,
    base: dict[str, dict[str, int]],
    region: str,
    services: Sequence[str],
    scope: str,
) -> dict[str, Any]:
    revision = await settle(cluster, base, SETTLE_TIMEOUT_S)
    followers = {
        a.id: Follower(a.url, session, [("down", lambda d: down_in(d, region, services))], revision)
        for a in cluster.agents.values()
    }
    await asyncio.sleep(random.uniform(0, INTERVAL_S))  # no fixed phase against the probes
    t_fault = time.time()
    tasks = [asyncio.create_task(f.run()) for f in followers.values()]
    try:
        for s in services:
            await cluster.set_backend(region, s, **FAULTS["refuse"])
        async with asyncio.timeout(STAGE_TIMEOUT_S):
            await asyncio.gather(*tasks)
        downs = [f.seen["down"] for f in followers.values()]
        first = min((d for _, d in downs), key=lambda d: int(d["revision"]))
        return {
            "scope": scope,
            "region": region,
            "services": list(services),
            "client_all": round(max(at for at, _ in downs) - t_fault, 4),
            "committed": round(float(first["committed_at_unix"]) - t_fault, 4),
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cluster.heal_region(region)


# -- the run -----------------------------------------------------------------------------


async def measure(
    config: dict[str, Any],
    workdir: Path,
    args: argparse.Namespace,
    trials: int,
    label: str,
) -> dict[str, Any]:
    regions = list(config["regions"])
    services = list(next(iter(config["regions"].values()))["services"])
    pairs = len(regions) * len(services)
    out: dict[str, Any] = {
        "regions": len(regions),
        "services": len(services),
        "pairs": pairs,
        "agents": len(config["cluster"]["agents"]),
    }
    started = time.monotonic()
    async with LocalCluster(config, workdir=workdir) as cluster:
        await cluster.wait_ready(180.0)
        out["ready_s"] = round(time.monotonic() - started, 1)
        base = weights_of(await cluster.wait_ready(60.0))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
            await settle(cluster, base, SETTLE_TIMEOUT_S)
            await asyncio.sleep(args.settle_s)  # start-up's first observations and decisions pass
            print(f"{label}: {out['agents']} agents, {pairs} pairs, ready in {out['ready_s']} s", flush=True)
            out["quiet"] = quiet_phase_result = await quiet_phase(cluster, session, args.quiet_s, pairs)
            print_quiet(label, quiet_phase_result)
            out["commit"] = await commit_latency(cluster, args.intents)
            c = out["commit"]["latency_ms"]
            statuses = out["commit"]["statuses"]
            print(f"commit latency (ms): p50 {c['p50']} p99 {c['p99']} max {c['max']} {statuses}")
            results: list[dict[str, Any]] = []
            for i in range(trials):
                pair_region = regions[(3 * i + 1) % len(regions)]
                pair_service = services[i % len(services)]
                whole_region = regions[(len(regions) - 1 - 2 * i) % len(regions)]
                for scope, region, svcs in (
                    ("pair", pair_region, [pair_service]),
                    ("region", whole_region, services),
                ):
                    one = await failover_trial(cluster, session, base, region, svcs, scope)
                    one["trial"] = i
                    results.append(one)
                    print(
                        f"trial {i + 1}/{trials} {scope} {region}"
                        f"{'/' + svcs[0] if scope == 'pair' else ''}: every agent's client "
                        f"{one['client_all']:.3f} s (committed {one['committed']:.3f} s)",
                        flush=True,
                    )
            out["failover_trials"] = results
            out["failover"] = {
                scope: {
                    stage: percentiles(r[stage] for r in results if r["scope"] == scope)
                    for stage in ("client_all", "committed")
                }
                for scope in ("pair", "region")
            }
    return out


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    measured = machine()  # at the start: the commit the agents run
    started = time.monotonic()
    config = scale_config(args.regions, args.services, args.agents, args.ttl_s)
    window = FALL * INTERVAL_S + TIMEOUT_S
    scale = await measure(config, workdir / "scale", args, args.trials, "scale")
    baseline = None
    if args.baseline:
        baseline = await measure(baseline_config(args.ttl_s), workdir / "baseline", args, 0, "baseline")
    target_s = window + FAILOVER_MARGIN_S
    p99 = {scope: scale["failover"][scope]["client_all"]["p99"] for scope in ("pair", "region")}
    cpu_max = scale["quiet"]["cpu_percent_max"]
    print(f"\nfailover, fault -> every agent's client (s); detection window {window:.1f} s")
    print_table(
        ["scope", "n", "p50", "p95", "p99", "max"],
        [
            [scope, p["n"], p["p50"], p["p95"], p["p99"], p["max"]]
            for scope, p in ((s, scale["failover"][s]["client_all"]) for s in ("pair", "region"))
        ],
    )
    met = {s: v is not None and v <= target_s for s, v in p99.items()}
    word = {s: "met" if m else "MISSED" for s, m in met.items()}
    print(
        f"targets: failover p99 <= {target_s:.1f} s: pair {p99['pair']} ({word['pair']}), "
        f"region {p99['region']} ({word['region']}); each agent < "
        f"{CPU_TARGET_PERCENT:g} % of a core when quiet: max {cpu_max} % "
        f"({'met' if cpu_max < CPU_TARGET_PERCENT else 'MISSED'})"
    )
    return {
        "benchmark": "scale",
        "machine": measured,
        "settings": {
            "regions": args.regions,
            "services": args.services,
            "agents": args.agents,
            "probe_interval_s": INTERVAL_S,
            "probe_timeout_s": TIMEOUT_S,
            "fall": FALL,
            "rise": RISE,
            "observation_ttl_s": args.ttl_s,
            "refresh_s": round(args.ttl_s / 3, 3),
            "quiet_s": args.quiet_s,
            "intents": args.intents,
            "trials": args.trials,
            "baseline": args.baseline,
        },
        "scale": scale,
        "baseline": baseline,
        "detection_window_s": window,
        "targets": {
            "failover_p99_target_s": target_s,
            "failover_pair_p99_s": p99["pair"],
            "failover_region_p99_s": p99["region"],
            "failover_pair_met": met["pair"],
            "failover_region_met": met["region"],
            "cpu_percent_target": CPU_TARGET_PERCENT,
            "cpu_percent_max": cpu_max,
            "cpu_met": cpu_max < CPU_TARGET_PERCENT,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", type=int, default=20)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--quiet-s", type=float, default=60.0, help="length of the quiet phase (s)")
    ap.add_argument("--settle-s", type=float, default=10.0, help="wait after start-up before measuring (s)")
    ap.add_argument("--intents", type=int, default=30, help="feature intents timed for commit latency")
    ap.add_argument("--trials", type=int, default=5, help="failover trials of each scope (pair, region)")
    ap.add_argument("--ttl-s", type=float, default=6.0, help="policy.observation_ttl_s (refresh every ttl/3)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    add_common_args(ap)
    execute("scale", ap.parse_args(), run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
