"""How fast thousands of watchers on one agent hear of a new decision, and what they cost it.

    python -m bench.watch --watchers 1000,10000 [--kinds blocking,sse] [--rounds 5]
        [--workers N] [--json FILE]

A real 3-agent cluster; every watcher is attached to one follower agent (`api.max_watchers`
raised to fit). For each size and kind, client processes (`--workers`, by default one
per 2,500 watchers: one asyncio client on these 2 cores cannot read 10,000 sockets in
time by itself) open the watchers with a minimal HTTP/1.1 client over asyncio streams
(uvloop when installed):

- `blocking`: `GET /v1/decision?index=N&wait=120s`; on each answer the watcher asks
  again with the new revision, as a load balancer long-polling the agent would;
- `sse`: one `GET /v1/watch?index=N` stream each; a revision counts when its `data:`
  line has arrived.

Once the agent reports holding them all (`controlplane_watchers` on /metrics), each
round POSTs an intent (a feature switch, alternating) to the leader, takes the decision's
`committed_at_unix`, and collects from every watcher when it first had that revision:
latency = arrival - commit, p50/p99/max over all watchers of all rounds. Decisions
committed meanwhile that the benchmark did not cause (`unplanned_decisions`, with their
reasons) are listed: a busy agent can miss its own probes. The agent's
RSS, threads, fds and CPU (from /proc/<pid>) are sampled before the watchers connect,
while it holds them idle (CPU over `--hold-s`), and across the rounds; the client
processes report their own CPU so a saturated client shows up as such.

The RLIMIT_NOFILE soft limit of this process is raised first; the agents and the client
processes inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import re
import resource
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    ProcStats,
    add_common_args,
    agent_env,
    bench_config,
    cpu_percent,
    execute,
    loadavg,
    machine,
    percentiles,
    print_table,
    raise_nofile,
)
from controlplane.testing.localcluster import LocalCluster

WAIT = "120s"
CONNECT_CONCURRENCY = 100
CONNECT_ATTEMPTS = 5
COLLECT_TIMEOUT_S = 60.0
WATCHERS_PER_WORKER = 2500
ROUND_GAP_S = 2.0
TARGET_P99_MS = 250.0
TARGET_RSS_MB = 80.0
REVISION_RE = re.compile(rb"x-controlplane-revision:\s*(\d+)", re.IGNORECASE)
LENGTH_RE = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


# -- the client processes ---------------------------------------------------------------


class Progress:
    """How many of a worker's watchers have reached the revision being collected."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.target = 1 << 62
        self.reached = 0
        self.done = asyncio.Event()

    def start(self, target: int, watchers: list[Watcher]) -> None:
        self.target = target
        self.reached = sum(1 for w in watchers if w.last >= target)
        self.done.clear()
        if self.reached >= self.count:
            self.done.set()


class Watcher:
    """One watcher's history: (revision, arrival time) of each revision it received."""

    __slots__ = ("history", "last", "progress")

    def __init__(self, progress: Progress) -> None:
        self.history: list[tuple[int, float]] = []
        self.last = -1
        self.progress = progress

    def got(self, revision: int, at: float) -> None:
        if revision > self.last:
            p = self.progress
            if self.last < p.target <= revision:
                p.reached += 1
                if p.reached >= p.count:
                    p.done.set()
            self.last = revision
            self.history.append((revision, at))

    def first_at(self, revision: int) -> float | None:
        for rev, at in self.history:
            if rev >= revision:
                return at
        return None


async def blocking_watcher(
    host: str, port: int, index: int, w: Watcher, connected: asyncio.Semaphore
) -> None:
    async with connected:
        reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            writer.write(
                f"GET /v1/decision?index={index}&wait={WAIT} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            length = LENGTH_RE.search(head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            at = time.time()
            found = REVISION_RE.search(head)
            if found is not None:
                w.got(int(found.group(1)), at)
                index = max(index, w.last)
    finally:
        writer.close()


async def sse_watcher(host: str, port: int, index: int, w: Watcher, connected: asyncio.Semaphore) -> None:
    # The semaphore is held until the stream's head arrives, so that connections the
    # agent has not accepted yet stay few; one reset before the head (an agent too busy
    # to accept in time) is retried, a few times, after a pause.
    for attempt in range(CONNECT_ATTEMPTS):
        async with connected:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET /v1/watch?index={index} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if attempt + 1 == CONNECT_ATTEMPTS:
                    raise
            except BaseException:
                writer.close()
                raise
        await asyncio.sleep(0.2 * (attempt + 1))
    try:
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        revision = -1
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("stream closed")
            if line.startswith(b"id: "):
                revision = int(line[4:].rpartition(b".")[2])  # epoch.revision
            elif line.startswith(b"data: ") and revision >= 0:
                w.got(revision, time.time())
    finally:
        writer.close()


async def worker_main(conn: Connection, host: str, port: int, kind: str, count: int, index: int) -> None:
    progress = Progress(count)
    watchers = [Watcher(progress) for _ in range(count)]
    connected = asyncio.Semaphore(CONNECT_CONCURRENCY)
    run = blocking_watcher if kind == "blocking" else sse_watcher
    tasks = [asyncio.create_task(run(host, port, index, w, connected)) for w in watchers]
    failed: list[str] = []

    def note(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(repr(task.exception()))

    for t in tasks:
        t.add_done_callback(note)
    while True:
        message = await asyncio.to_thread(conn.recv)
        if message[0] == "stop":
            break
        if message[0] == "status":
            conn.send(("status", len(failed), failed[:3]))
        elif message[0] == "collect":
            revision = message[1]
            progress.start(revision, watchers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.done.wait(), COLLECT_TIMEOUT_S)
            times = [w.first_at(revision) for w in watchers]
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(
                (
                    "collected",
                    [t for t in times if t is not None],
                    sum(1 for t in times if t is None),
                    usage.ru_utime + usage.ru_stime,
                    len(failed),
                )
            )
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(("stopped",))


def worker(conn: Connection, host: str, port: int, kind: str, count: int, index: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(worker_main(conn, host, port, kind, count, index))


# -- the coordinator --------------------------------------------------------------------


class Api:
    """The coordinator's own HTTP client: patient (30 s), since the agent under test is busy."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self.session.close()

    def url(self, agent: str, path: str) -> str:
        return self.cluster.agents[agent].url + path

    async def get(self, agent: str, path: str) -> Any:
        async with self.session.get(self.url(agent, path)) as r:
            r.raise_for_status()
            return await r.json(content_type=None)

    async def metric(self, agent: str, name: str) -> float | None:
        async with self.session.get(self.url(agent, "/metrics")) as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    async def commit_round(self, writer: str, agent: str, enabled: bool) -> tuple[int, float]:
        """POST a feature intent to `writer`; (revision, committed_at_unix) as `agent` serves it."""
        body = {"kind": "feature", "name": "comments", "enabled": enabled, "reason": "bench.watch"}
        headers = {"Authorization": f"Bearer {self.cluster.admin_token}"}
        async with self.session.post(self.url(writer, "/v1/intents"), json=body, headers=headers) as r:
            answer = await r.json(content_type=None)
            if r.status not in (200, 201):
                raise RuntimeError(f"POST /v1/intents: {r.status} {answer!r}")
        revision = int(answer["revision"])
        decision = await self.get(agent, f"/v1/decision?index={revision - 1}&wait=20s")
        if int(decision["revision"]) == revision:
            return revision, float(decision["committed_at_unix"])
        # Another decision followed at once (see `unplanned`): its commit time is in the history.
        for entry in await self.decisions_since(agent, revision - 1):
            if entry["revision"] == revision:
                return revision, float(entry["at"])
        raise RuntimeError(f"decision {revision} is not in {agent}'s history")

    async def decisions_since(self, agent: str, revision: int) -> list[dict[str, Any]]:
        """Decision entries of the history after `revision`, oldest first."""
        history = await self.get(agent, "/v1/history?limit=200")
        entries = [e for e in history["entries"] if e["kind"] == "decision" and e["revision"] > revision]
        return sorted(entries, key=lambda e: int(e["revision"]))


async def one_size(
    cluster: LocalCluster,
    api: Api,
    writer: str,
    agent: str,
    kind: str,
    n: int,
    workers: int,
    rounds: int,
    hold_s: float,
) -> dict[str, Any]:
    host, _, port_text = cluster.agents[agent].http.rpartition(":")
    proc = cluster.agents[agent].proc
    assert proc is not None
    stats = ProcStats(proc.pid)
    current = await api.get(agent, "/v1/decision")
    index = int(current["revision"])
    before = stats.sample()
    ctx = mp.get_context("spawn")
    shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    pipes: list[Connection] = []
    children = []
    peak_rss = before.rss_bytes
    try:
        for share in shares:
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker, args=(child, host, int(port_text), kind, share, index), daemon=True
            )
            p.start()
            pipes.append(parent)
            children.append(p)
        t0 = time.monotonic()
        while True:
            held = await api.metric(agent, "controlplane_watchers") or 0
            if held >= n:
                break
            if time.monotonic() - t0 > 120:
                raise TimeoutError(f"only {held:.0f} of {n} {kind} watchers connected after 120 s")
            for pipe in pipes:
                pipe.send(("status",))
            failures = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
            if any(f[1] for f in failures):
                raise RuntimeError(f"watchers failed to connect: {[f[2] for f in failures if f[1]]}")
            await asyncio.sleep(0.5)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        idle_start = stats.sample()
        await asyncio.sleep(hold_s)
        idle_end = stats.sample()
        peak_rss = max(peak_rss, idle_end.rss_bytes)
        latencies_ms: list[float] = []
        per_round = []
        missed = 0
        client_cpu = 0.0
        round_start = stats.sample()
        for r in range(rounds):
            revision, committed_at = await api.commit_round(writer, agent, enabled=r % 2 == 1)
            for pipe in pipes:
                pipe.send(("collect", revision))
            answers = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
            times = [t for a in answers for t in a[1]]
            missed += sum(a[2] for a in answers)
            client_cpu = sum(a[3] for a in answers)
            lat = [(t - committed_at) * 1000 for t in times]
            latencies_ms += lat
            per_round.append(
                {"revision": revision, **percentiles(lat, 1), "missed": sum(a[2] for a in answers)}
            )
            peak_rss = max(peak_rss, stats.rss_bytes())
            await asyncio.sleep(ROUND_GAP_S)  # let the re-armed blocking queries land first
        round_end = stats.sample()
        ours = {r["revision"] for r in per_round}
        unplanned = [
            {"revision": e["revision"], "summary": e["summary"]}
            for e in await api.decisions_since(agent, index)
            if e["revision"] not in ours
        ]
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(("stop",))
        for p in children:
            await asyncio.to_thread(p.join, 10)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)
    after = stats.sample()
    return {
        "kind": kind,
        "watchers": n,
        "client_processes": workers,
        "rounds": rounds,
        "connect_s": round(connect_s, 2),
        "latency_ms": percentiles(latencies_ms, 1),
        "missed": missed,
        "per_round": per_round,
        "unplanned_decisions": unplanned,
        "agent": {
            "rss_mb_before": round(before.rss_bytes / 2**20, 1),
            "rss_mb_holding": round(idle_end.rss_bytes / 2**20, 1),
            "rss_mb_peak": round(peak_rss / 2**20, 1),
            "rss_mb_after": round(after.rss_bytes / 2**20, 1),
            "fds_holding": idle_end.fds,
            "threads_holding": idle_end.threads,
            "cpu_percent_idle_hold": cpu_percent(idle_start, idle_end),
            "cpu_s_rounds": round(round_end.cpu_s - round_start.cpu_s, 2),
            "cpu_s_per_round": round((round_end.cpu_s - round_start.cpu_s) / rounds, 3),
        },
        "client_cpu_s": round(client_cpu, 2),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sizes = [int(x) for x in args.watchers.split(",")]
    kinds = args.kinds.split(",")
    for k in kinds:
        if k not in ("blocking", "sse"):
            raise SystemExit(f"--kinds: unknown kind {k!r} (blocking, sse)")
    nofile = raise_nofile(max(sizes) * 2 + 1024)
    config = bench_config(api={"max_watchers": min(100_000, max(sizes) + 1000)})
    results = []
    load_before = loadavg()
    measured = machine()  # at the start: the commit the agents run
    async with LocalCluster(config, workdir=workdir, extra_env=agent_env(args.agent_env)) as cluster:
        await cluster.wait_ready(90)
        leader = await cluster.wait_leader(30)
        agent = next(a for a in cluster.agents if a != leader)
        api = Api(cluster)
        try:
            for n in sizes:
                for kind in kinds:
                    workers = args.workers or max(1, min(4, -(-n // WATCHERS_PER_WORKER)))
                    print(f"{n} {kind} watchers on {agent} ({workers} client processes)...", flush=True)
                    results.append(
                        await one_size(
                            cluster, api, leader, agent, kind, n, workers, args.rounds, args.hold_s
                        )
                    )
                    await asyncio.sleep(1.0)
        finally:
            await api.close()
    rows = []
    for r in results:
        lat, a = r["latency_ms"], r["agent"]
        rows.append(
            [
                f"{r['watchers']} {r['kind']}",
                lat["p50"],
                lat["p99"],
                lat["max"],
                r["missed"],
                a["rss_mb_before"],
                a["rss_mb_holding"],
                a["rss_mb_peak"],
                a["cpu_percent_idle_hold"],
                a["cpu_s_per_round"],
                r["client_processes"],
                len(r["unplanned_decisions"]),
            ]
        )
    print(f"\ncommit -> every watcher has the revision ({args.rounds} rounds each), agent {agent}")
    print_table(
        [
            "watchers",
            "p50 ms",
            "p99 ms",
            "max ms",
            "missed",
            "RSS MB before",
            "holding",
            "peak",
            "idle CPU %",
            "CPU s/round",
            "clients",
            "other decisions",
        ],
        rows,
    )
    biggest = [r for r in results if r["watchers"] == max(sizes)]
    targets = {
        "watchers": max(sizes),
        "p99_target_ms": TARGET_P99_MS,
        "p99_ms": {r["kind"]: r["latency_ms"]["p99"] for r in biggest},
        "p99_met": {
            r["kind"]: r["latency_ms"]["p99"] is not None and r["latency_ms"]["p99"] <= TARGET_P99_MS
            for r in biggest
        },
        "rss_target_mb": TARGET_RSS_MB,
        "rss_mb_peak": {r["kind"]: r["agent"]["rss_mb_peak"] for r in biggest},
        "rss_met": {r["kind"]: r["agent"]["rss_mb_peak"] <= TARGET_RSS_MB for r in biggest},
    }
    print(f"targets at {max(sizes)} watchers: {targets}; load {loadavg()}")
    return {
        "benchmark": "watch",
        "settings": {
            "sizes": sizes,
            "kinds": kinds,
            "rounds": args.rounds,
            "hold_s": args.hold_s,
            "agent": agent,
            "leader": leader,
            "nofile_soft_limit": nofile,
            "agent_env": args.agent_env,
            "blocking_wait": WAIT,
        },
        "machine": measured,
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_wait": args.quiet_wait,
        "results": results,
        "targets": targets,
        "median_p99_ms": statistics.median(r["latency_ms"]["p99"] for r in results if r["latency_ms"]["n"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", default="1000,10000", help="comma-separated sizes")
    ap.add_argument("--kinds", default="blocking,sse")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0, help="client processes (0: one per 2,500 watchers)")
    ap.add_argument(
        "--hold-s", type=float, default=5.0, help="idle hold over which the agent's CPU is measured"
    )
    ap.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the agents (e.g. to try a proposed fix); repeatable",
    )
    add_common_args(ap)
    args = ap.parse_args()
    execute("watch", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
