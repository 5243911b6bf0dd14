"""Whether an agent busy serving can be fooled by its own load into reporting healthy regions down.

    python -m bench.probes_under_load --watchers 10000 --minutes 10 [--connections 64]
        [--commit-every-s 10] [--json FILE]

A real 3-agent cluster on the demo deployment, every region healthy all along (the
simulated backends never fail). One follower, the *loaded* agent, holds `--watchers` SSE
streams (opened by client processes, as in `bench.watch`) and is flooded by `wrk` on
`GET /v1/decision` for the whole run; every `--commit-every-s` an intent is committed
through the leader, so the watchers are woken too. The other follower, the *idle* agent,
serves nothing: it is the baseline, measured in the same run, on the same machine, over
the same minutes.

Counted for each of the two agents, from the replicated store (polled on the leader,
which is neither of them) and from each agent's own /metrics:

- `false_down`: observations by that agent that say a region is down (conclusive, not
  impaired); every region is healthy, so each one is false. Target: 0 for the loaded agent;
- `impaired` and `inconclusive` observations (the agent knew its probes were late:
  neither counts against a region);
- probe failures and inconclusive probes (the counters of /metrics);
- the probe latency it reports (`latency_ms` of its observations): p50/p95/p99, and the
  loaded agent's median over the idle agent's;
- `unplanned_decisions`: decisions committed that the benchmark did not cause, with
  their reasons.

A false DOWN from one agent cannot move traffic by itself (the quorum holds), which is
why it is counted at the observation, before the quorum hides it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.api import parse_wrk
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
    raise_nofile,
    ratio,
    require_binary,
)
from bench.watch import WATCHERS_PER_WORKER, worker
from controlplane.testing.localcluster import LocalCluster

POLL_S = 0.5
TARGET_FALSE_DOWN = 0
TARGET_LATENCY_DELTA_MS = 5.0


class Tally:
    """Every distinct observation one agent published during the run."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, float], dict[str, Any]] = {}

    def add(self, o: Mapping[str, Any]) -> None:
        self.seen.setdefault((o["region"], o["service"], float(o["at"])), dict(o))

    def summary(self) -> dict[str, Any]:
        obs = list(self.seen.values())
        down = [o for o in obs if not o["up"] and not o.get("inconclusive") and not o.get("impaired")]
        return {
            "observations": len(obs),
            "false_down": len(down),
            "false_down_examples": [
                {k: o.get(k) for k in ("region", "service", "at", "error")} for o in down[:5]
            ],
            "impaired": sum(1 for o in obs if o.get("impaired")),
            "impaired_examples": sorted({str(o["impaired"]) for o in obs if o.get("impaired")})[:5],
            "inconclusive": sum(1 for o in obs if o.get("inconclusive")),
            "latency_ms": percentiles((o["latency_ms"] for o in obs if o.get("latency_ms") is not None), 2),
        }


async def probe_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Probe failures, inconclusive probes, and the duration histogram's count and sum."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    wanted = {
        "controlplane_probe_failures_total": "failures",
        "controlplane_probe_inconclusive_total": "inconclusive",
        "controlplane_probe_duration_seconds_count": "probes",
        "controlplane_probe_duration_seconds_sum": "duration_sum_s",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in before}
    return {
        "probes": int(d["probes"]),
        "failures": int(d["failures"]),
        "inconclusive": int(d["inconclusive"]),
        "mean_probe_ms": round(1000 * d["duration_sum_s"] / d["probes"], 2) if d["probes"] else None,
    }


async def run_wrk(binary: str, url: str, args: argparse.Namespace, duration_s: int) -> dict[str, Any]:
    argv = [binary, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s", "--timeout", "5s"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "--latency",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(duration_s + 60):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_wrk(out.decode())


class Watchers:
    """SSE watchers on one agent, held by client processes (`bench.watch.worker`)."""

    def __init__(self, host: str, port: int, count: int, index: int) -> None:
        self.count = count
        self.pipes: list[Connection] = []
        self.children: list[Any] = []
        if count <= 0:
            return
        workers = max(1, min(4, -(-count // WATCHERS_PER_WORKER)))
        ctx = mp.get_context("spawn")
        for i in range(workers):
            share = count // workers + (1 if i < count % workers else 0)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(child, host, port, "sse", share, index), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.children.append(p)

    async def failures(self) -> list[str]:
        for pipe in self.pipes:
            pipe.send(("status",))
        answers = [await asyncio.to_thread(pipe.recv) for pipe in self.pipes]
        return [str(a[2]) for a in answers if a[1]]

    async def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for p in self.children:
            await asyncio.to_thread(p.join, 10)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)


async def metric_value(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """The value of an unlabelled series; 0 when the agent is too busy to answer in time."""
    try:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    wrk_bin = require_binary("wrk", "wrk")
    duration_s = max(1, round(args.minutes * 60))
    nofile = raise_nofile(args.watchers * 2 + 1024)
    config = bench_config(api={"max_watchers": min(100_000, args.watchers + 1000)})
    measured = machine()
    load_before = loadavg()
    async with LocalCluster(config, workdir=workdir) as cluster:
        await cluster.wait_ready(90)
        leader = await cluster.wait_leader(30)
        loaded, idle = [a for a in cluster.agents if a != leader][:2]
        urls = {name: cluster.agents[name].url for name in (leader, loaded, idle)}
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        tallies = {loaded: Tally(), idle: Tally()}
        proc = cluster.agents[loaded].proc
        idle_proc = cluster.agents[idle].proc
        assert proc is not None and idle_proc is not None
        stats, idle_stats = ProcStats(proc.pid), ProcStats(idle_proc.pid)
        host, _, port = cluster.agents[loaded].http.rpartition(":")
        async with session.get(urls[leader] + "/v1/decision") as r:
            index = int((await r.json())["revision"])
        watchers = Watchers(host, int(port), args.watchers, index)
        commits = 0
        try:
            t0 = time.monotonic()
            while (
                held := await metric_value(session, urls[loaded], "controlplane_watchers")
            ) < args.watchers:
                if time.monotonic() - t0 > args.connect_timeout_s:
                    raise TimeoutError(
                        f"{held:.0f} of {args.watchers} watchers on {loaded}"
                        f" after {args.connect_timeout_s:g} s"
                    )
                if failed := await watchers.failures():
                    raise RuntimeError(f"watchers failed to connect: {failed}")
                print(f"  {held:.0f} watchers on {loaded}", flush=True)
                await asyncio.sleep(2.0)
            connect_s = time.monotonic() - t0
            print(f"{args.watchers} SSE watchers on {loaded} after {connect_s:.1f} s; idle baseline {idle}")
            before = {a: await probe_counters(session, urls[a]) for a in (loaded, idle)}
            start, idle_start = stats.sample(), idle_stats.sample()
            started_at = time.time()
            print(f"wrk on {loaded} /v1/decision for {duration_s} s...", flush=True)
            flood = asyncio.create_task(run_wrk(wrk_bin, urls[loaded] + "/v1/decision", args, duration_s))
            headers = {"Authorization": f"Bearer {cluster.admin_token}"}
            next_commit = time.monotonic() + args.commit_every_s
            poll_failures = 0
            try:
                while not flood.done():
                    try:
                        async with session.get(urls[leader] + "/v1/observations") as r:
                            body = await r.json()
                    except (TimeoutError, aiohttp.ClientError):
                        poll_failures += 1
                        body = {"observations": []}
                    for o in body["observations"]:
                        if o["observer"] in tallies and float(o["at"]) >= started_at:
                            tallies[o["observer"]].add(o)
                    if args.commit_every_s > 0 and time.monotonic() >= next_commit:
                        intent = {
                            "kind": "feature",
                            "name": "comments",
                            "enabled": commits % 2 == 1,
                            "reason": "bench.probes_under_load",
                        }
                        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                            async with session.post(
                                urls[leader] + "/v1/intents", json=intent, headers=headers
                            ) as r:
                                if r.status in (200, 201):
                                    commits += 1
                        next_commit += args.commit_every_s
                    await asyncio.wait({flood}, timeout=POLL_S)
                wrk_result = await flood
            finally:
                if not flood.done():
                    flood.cancel()
                    await asyncio.gather(flood, return_exceptions=True)
            end, idle_end = stats.sample(), idle_stats.sample()
            after = {a: await probe_counters(session, urls[a]) for a in (loaded, idle)}
            async with session.get(urls[leader] + "/v1/history?limit=500") as r:
                history = await r.json()
            unplanned = [
                {"revision": e["revision"], "summary": e.get("summary")}
                for e in history["entries"]
                if e["kind"] == "decision"
                and e["revision"] > index
                # An intent's revision is not its decision's: judge by what the decision says.
                and ("impaired" in str(e.get("summary")) or "feature comments" not in str(e.get("summary")))
            ]
        finally:
            await watchers.stop()
            await session.close()
    agents: dict[str, Any] = {}
    for role, name, a, b in (("loaded", loaded, start, end), ("idle", idle, idle_start, idle_end)):
        agents[role] = {
            "agent": name,
            **tallies[name].summary(),
            "probe_counters": counter_delta(before[name], after[name]),
            "cpu_percent": cpu_percent(a, b),
            "rss_mb_end": round(b.rss_bytes / 2**20, 1),
            "threads_end": b.threads,
        }
    lo, il = agents["loaded"], agents["idle"]
    latency_p50 = (lo["latency_ms"]["p50"], il["latency_ms"]["p50"])
    delta = None if None in latency_p50 else round(latency_p50[0] - latency_p50[1], 2)
    targets = {
        "false_down_target": TARGET_FALSE_DOWN,
        "false_down": lo["false_down"],
        "false_down_met": lo["false_down"] <= TARGET_FALSE_DOWN,
        "latency_p50_delta_ms": delta,
        "latency_p50_ratio": ratio(*latency_p50),
        "latency_delta_target_ms": TARGET_LATENCY_DELTA_MS,
        "latency_met": delta is not None and delta <= TARGET_LATENCY_DELTA_MS,
        "minutes": round(duration_s / 60, 2),
    }
    rows = [
        [
            f"{role} {v['agent']}",
            v["observations"],
            v["false_down"],
            v["impaired"],
            v["inconclusive"],
            v["probe_counters"]["failures"],
            v["probe_counters"]["inconclusive"],
            v["latency_ms"]["p50"],
            v["latency_ms"]["p99"],
            v["probe_counters"]["mean_probe_ms"],
            v["cpu_percent"],
        ]
        for role, v in agents.items()
    ]
    print(f"\n{duration_s} s of wrk ({wrk_result['rps']} req/s) and {args.watchers} watchers")
    print_table(
        [
            "agent",
            "observations",
            "false DOWN",
            "impaired",
            "inconcl.",
            "probe fail",
            "probe inconcl.",
            "p50 ms",
            "p99 ms",
            "mean probe ms",
            "CPU %",
        ],
        rows,
    )
    print(f"targets: {targets}; unplanned decisions: {len(unplanned)}; load {loadavg()}")
    return {
        "benchmark": "probes_under_load",
        "settings": {
            "watchers": args.watchers,
            "duration_s": duration_s,
            "wrk_threads": args.threads,
            "wrk_connections": args.connections,
            "commit_every_s": args.commit_every_s,
            "connect_timeout_s": args.connect_timeout_s,
            "leader": leader,
            "nofile_soft_limit": nofile,
        },
        "machine": measured,
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_wait": args.quiet_wait,
        "connect_s": round(connect_s, 2),
        "wrk": wrk_result,
        "commits": commits,
        "observation_poll_failures": poll_failures,
        "agents": agents,
        "unplanned_decisions": unplanned,
        "targets": targets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=10_000, help="SSE streams held by the loaded agent")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long wrk floods the loaded agent")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument(
        "--commit-every-s", type=float, default=10.0, help="commit an intent this often (0: never)"
    )
    ap.add_argument(
        "--connect-timeout-s", type=float, default=600.0, help="how long the watchers may take to connect"
    )
    add_common_args(ap)
    args = ap.parse_args()
    execute("probes_under_load", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
