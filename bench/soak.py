"""Does an agent's memory, thread or fd count grow under steady churn? A bounded soak.

    python -m bench.soak --minutes 5 [--probe-interval 0.25] [--watchers 300]
        [--intent-every-s 3] [--flap-every-s 30] [--sample-s 5] [--warmup-s 60] [--json FILE]

A real 3-agent cluster probing every 250 ms. For `--minutes`:

- `--watchers` watcher slots churn against random agents: each connects (a blocking
  query, re-armed on every answer, or an SSE stream), holds for 0.2-8 s and drops the
  connection, often in the middle of a wait, then connects again;
- an intent (a feature switch, alternating) is POSTed to a random agent every
  `--intent-every-s`;
- every `--flap-every-s` one region's `order` backend fails for a few seconds and
  heals, so verdicts, holds and ramps run too.

Every `--sample-s`, each agent's RSS, thread count and open fds are read from
/proc/<pid> (the agent does not expose its asyncio task count; threads are the closest
/proc gives), with the sizes that grow up to a bound by design: the history's length
(`HISTORY_LIMIT`, 1,000 entries) and the Raft commit index (the in-memory Raft log is
compacted every 300 s or 5,000 entries). Memory that grows while these fill is not yet
a leak; growth after they are full is. After the warm-up, growth is (median of the last 3 samples / median of
the first 3) - 1, and a least-squares slope, extrapolated to 30 minutes. At the end the
churn stops and every agent's `controlplane_watchers` gauge must come back to 0.

Limitation: when memory grows, the allocation sites cannot be read from outside: the
agent has no tracemalloc hook. The report says so instead of guessing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ProcStats,
    add_common_args,
    bench_config,
    execute,
    loadavg,
    machine,
    print_table,
)
from controlplane.testing.localcluster import LocalCluster

GROWTH_TARGET_PERCENT = 2.0
REGIONS = ("cn-east", "cn-south", "cn-north")


class Counters:
    def __init__(self) -> None:
        self.connects = 0
        self.answers = 0
        self.events = 0
        self.errors = 0
        self.intents = 0
        self.intent_errors = 0
        self.flaps = 0
        self.last_error = ""


async def one_watch(host: str, port: int, sse: bool, lifetime_s: float, counters: Counters) -> None:
    """One connection held for about `lifetime_s`, then dropped without ceremony."""
    reader, writer = await asyncio.open_connection(host, port)
    counters.connects += 1
    try:
        async with asyncio.timeout(lifetime_s):
            if sse:
                writer.write(f"GET /v1/watch HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                while line := await reader.readline():
                    if line.startswith(b"data: "):
                        counters.events += 1
            else:
                index = 0
                while True:
                    wait = random.choice(("1s", "3s", "30s"))
                    path = f"/v1/decision?index={index}&wait={wait}"
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    index = int(head.lower().split(b"x-controlplane-revision:")[1].split(b"\r\n")[0])
                    counters.answers += 1
    except TimeoutError:
        pass  # the planned drop
    finally:
        writer.close()


async def churn(addresses: list[tuple[str, int]], counters: Counters, stop: asyncio.Event) -> None:
    while not stop.is_set():
        host, port = random.choice(addresses)
        try:
            await one_watch(host, port, random.random() < 0.5, random.uniform(0.2, 8.0), counters)
        except (OSError, RuntimeError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
            counters.errors += 1
            counters.last_error = repr(e)
            await asyncio.sleep(0.2)


async def intents(cluster: LocalCluster, every_s: float, counters: Counters, stop: asyncio.Event) -> None:
    enabled = False
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
            return
        body = {"kind": "feature", "name": "likes", "enabled": enabled, "reason": "bench.soak"}
        status, _ = await cluster.post(random.choice(list(cluster.agents)), "/v1/intents", body)
        counters.intents += 1
        if status not in (200, 201):
            counters.intent_errors += 1
        enabled = not enabled


async def flaps(cluster: LocalCluster, every_s: float, counters: Counters, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
            return
        region = REGIONS[n % len(REGIONS)]
        n += 1
        await cluster.fail_region(region, "order")
        counters.flaps += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 3.0)
        await cluster.heal_region(region, "order")


def growth(samples: list[dict[str, Any]], key: str, warmup_s: float) -> dict[str, Any]:
    """Growth of `key` after the warm-up: end vs start medians, and the slope."""
    start_at = samples[0]["t"] + warmup_s
    xs = [s for s in samples if s["t"] >= start_at]
    if len(xs) < 4:
        return {
            "samples": len(xs),
            "first": None,
            "last": None,
            "growth_percent": None,
            "per_30min_percent": None,
        }
    first = statistics.median(s[key] for s in xs[:3])
    last = statistics.median(s[key] for s in xs[-3:])
    ts = [s["t"] for s in xs]
    ys = [s[key] for s in xs]
    mean_t, mean_y = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0
    return {
        "samples": len(xs),
        "first": first,
        "last": last,
        "min": min(ys),
        "max": max(ys),
        "growth_percent": round(100.0 * (last - first) / first, 2) if first else None,
        "slope_per_hour": round(slope * 3600, 3),
        "per_30min_percent": round(100.0 * slope * 1800 / first, 2) if first else None,
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = bench_config(interval_s=args.probe_interval, policy={"recovery_hold_s": 2.0, "ramp_step_s": 1.0})
    duration_s = args.minutes * 60
    warmup_s = min(args.warmup_s, duration_s / 2)
    counters = Counters()
    samples: dict[str, list[dict[str, Any]]] = {}
    load_before = loadavg()
    measured = machine()  # at the start: the commit the agents run
    load_samples: list[list[float]] = []
    async with LocalCluster(config, workdir=workdir) as cluster:
        await cluster.wait_ready(90)
        stats = {a.id: ProcStats(a.proc.pid) for a in cluster.agents.values() if a.proc is not None}
        samples = {agent: [] for agent in stats}
        addresses = []
        for a in cluster.agents.values():
            host, _, port = a.http.rpartition(":")
            addresses.append((host, int(port)))
        stop = asyncio.Event()
        tasks = [asyncio.create_task(churn(addresses, counters, stop)) for _ in range(args.watchers)]
        tasks.append(asyncio.create_task(intents(cluster, args.intent_every_s, counters, stop)))
        if args.flap_every_s > 0:
            tasks.append(asyncio.create_task(flaps(cluster, args.flap_every_s, counters, stop)))
        started = time.monotonic()
        try:
            while True:
                now = time.monotonic() - started
                for agent, st in stats.items():
                    cluster.check_alive([agent])
                    s = st.sample()
                    samples[agent].append(
                        {
                            "t": round(now, 1),
                            "rss_mb": round(s.rss_bytes / 2**20, 2),
                            "threads": s.threads,
                            "fds": s.fds,
                            "cpu_s": round(s.cpu_s, 2),
                            "tasks": (await scraped(cluster, agent)).get("tasks"),
                            **await bounded_state(cluster, agent),
                        }
                    )
                load_samples.append(loadavg())
                if now >= duration_s:
                    break
                print(
                    f"{now:6.0f} s  "
                    + "  ".join(f"{a}: {v[-1]['rss_mb']} MB {v[-1]['fds']} fds" for a, v in samples.items())
                    + f"  connects {counters.connects} errors {counters.errors}",
                    flush=True,
                )
                await asyncio.sleep(min(args.sample_s, max(0.1, duration_s - now)))
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Every dropped watcher must have been let go by the agents.
        drained: dict[str, float | None] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for agent in stats:
                drained[agent] = await watchers_gauge(cluster, agent)
            if all(v == 0 for v in drained.values()):
                break
            await asyncio.sleep(0.5)
        final_fds = {agent: st.sample().fds for agent, st in stats.items()}

    per_agent = {}
    rows = []
    for agent, xs in samples.items():
        g = {key: growth(xs, key, warmup_s) for key in ("rss_mb", "threads", "fds")}
        # Tasks include the watchers' handlers, so they follow the churn: compare ranges.
        tasks = [x["tasks"] for x in xs if x["t"] >= xs[0]["t"] + warmup_s and x.get("tasks") is not None]
        after_warmup = [x for x in xs if x["t"] >= xs[0]["t"] + warmup_s] or xs
        cpu = (xs[-1]["cpu_s"] - xs[0]["cpu_s"]) / max(1.0, xs[-1]["t"] - xs[0]["t"]) * 100
        per_agent[agent] = {
            "growth": g,
            "cpu_percent_mean": round(cpu, 1),
            "tasks_after_warmup": {
                "min": min(tasks, default=None),
                "median": statistics.median(tasks) if tasks else None,
                "max": max(tasks, default=None),
                "first_third_max": max(tasks[: len(tasks) // 3], default=None),
                "last_third_max": max(tasks[-(len(tasks) // 3) :], default=None) if len(tasks) >= 3 else None,
            },
            "watchers_after_drain": drained.get(agent),
            "fds_after_drain": final_fds[agent],
            "history_total": {
                "first": after_warmup[0].get("history_total"),
                "last": xs[-1].get("history_total"),
            },
            "commit_index": {
                "first": after_warmup[0].get("commit_index"),
                "last": xs[-1].get("commit_index"),
            },
        }
        rss = g["rss_mb"]
        rows.append(
            [
                agent,
                rss["first"],
                rss["last"],
                rss["max"],
                rss["growth_percent"],
                rss["per_30min_percent"],
                f"{g['threads']['first']}->{g['threads']['last']}",
                f"{g['fds']['first']}->{g['fds']['last']}",
                "{first_third_max}->{last_third_max}".format(**per_agent[agent]["tasks_after_warmup"]),
                drained.get(agent),
                round(cpu, 1),
                f"{per_agent[agent]['history_total']['first']}->{per_agent[agent]['history_total']['last']}",
            ]
        )
    print(
        f"\n{args.minutes:g} min soak (growth after {warmup_s:.0f} s warm-up), "
        f"probes every {args.probe_interval} s, {args.watchers} churning watchers"
    )
    print_table(
        [
            "agent",
            "RSS MB first",
            "last",
            "max",
            "growth %",
            "slope %/30min",
            "threads",
            "fds",
            "tasks max (1st->3rd third)",
            "watchers after",
            "CPU %",
            "history",
        ],
        rows,
    )
    print(
        f"connects {counters.connects}, blocking answers {counters.answers}, SSE events {counters.events}, "
        f"errors {counters.errors} ({counters.last_error or '-'}), intents {counters.intents} "
        f"({counters.intent_errors} failed), flaps {counters.flaps}; load {loadavg()}"
    )
    worst = max(
        (p["growth"]["rss_mb"]["growth_percent"] or 0.0 for p in per_agent.values()),
        default=0.0,
    )
    return {
        "benchmark": "soak",
        "settings": {
            "minutes": args.minutes,
            "probe_interval_s": args.probe_interval,
            "watchers": args.watchers,
            "intent_every_s": args.intent_every_s,
            "flap_every_s": args.flap_every_s,
            "sample_s": args.sample_s,
            "warmup_s": warmup_s,
        },
        "machine": measured,
        "load_before": load_before,
        "load_after": loadavg(),
        "load_samples": load_samples,
        "quiet_wait": args.quiet_wait,
        "counters": vars(counters),
        "agents": per_agent,
        "samples": samples,
        "targets": {
            "rss_growth_target_percent_per_30min": GROWTH_TARGET_PERCENT,
            "worst_rss_growth_percent": worst,
            "worst_rss_per_30min_percent": max(
                (p["growth"]["rss_mb"]["per_30min_percent"] or 0.0 for p in per_agent.values()), default=0.0
            ),
            "met_over_run": worst < GROWTH_TARGET_PERCENT,
            "run_minutes": args.minutes,
        },
        "limitations": [
            "allocation sites are not reported: for that, run the agents with CONTROLPLANE_TRACEMALLOC"
            " and send SIGUSR2 (bench/README.md, diagnosis hooks)",
        ],
    }


async def bounded_state(cluster: LocalCluster, agent: str) -> dict[str, Any]:
    """Sizes of the agent's state that grow until a bound: history entries, Raft log index."""
    _, _, history = await cluster.get(agent, "/v1/history?limit=1")
    _, _, status = await cluster.get(agent, "/v1/cluster")
    return {
        "history_total": history.get("total") if isinstance(history, dict) else None,
        "commit_index": status.get("commit_index") if isinstance(status, dict) else None,
    }


async def scraped(cluster: LocalCluster, agent: str) -> dict[str, float]:
    """The agent's own gauges from /metrics: open watchers and asyncio tasks per loop."""
    try:
        async with cluster.session.get(cluster.agents[agent].url + "/metrics") as r:
            text = await r.text()
    except (OSError, TimeoutError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("controlplane_watchers "):
            out["watchers"] = float(line.split()[1])
        elif line.startswith('controlplane_asyncio_tasks{loop="main"}'):
            out["tasks"] = float(line.split()[1])
        elif line.startswith('controlplane_asyncio_tasks{loop="prober"}'):
            out["prober_tasks"] = float(line.split()[1])
    return out


async def watchers_gauge(cluster: LocalCluster, agent: str) -> float | None:
    return (await scraped(cluster, agent)).get("watchers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--probe-interval", type=float, default=0.25)
    ap.add_argument("--watchers", type=int, default=300, help="churning watcher slots")
    ap.add_argument("--intent-every-s", type=float, default=3.0)
    ap.add_argument("--flap-every-s", type=float, default=30.0, help="0: no backend faults")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="capped at half the run")
    add_common_args(ap)
    args = ap.parse_args()
    execute("soak", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
