"""The project's own Raft engine (controlplane/raft): commit latency, throughput, re-election.

    python -m bench.raft_engine [--commits 1000] [--throughput-n 3000] [--trials 10] [--json FILE]

Three real node processes (tests/raft/kvnode.py, a key-value state machine) on loopback,
each with its journal on disk, fsynced before every acknowledgement:

- commit latency: one proposer on the leader, one proposal at a time, measured inside
  the leader process from `propose()` to the future resolving (replicated to a majority,
  fsynced on the leader and a follower, applied on the leader); and the same through a
  follower (forwarded to the leader, resolved when applied on that follower);
- throughput: commits/s with 1, 10 and 100 proposals in flight on the leader, and the
  fsyncs the leader made per committed entry (batching: one fsync per Ready);
- re-election: SIGKILL of the leader -> a survivor reports itself leader (polled every
  5 ms), min/median/max over `--trials`; the killed node is restarted between trials.

The baseline is pysyncobj 0.3.17 as measured on this machine (shared/FACTS.md): 0.38 ms
median commit WITHOUT fsync, and re-election 305/407/457 ms with 0.3/0.6 s timeouts.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import add_common_args, execute, machine, percentiles, print_table
from controlplane.raft.settings import RaftTimings
from tests.raft.harness import ProcCluster, wait_for


def ms(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v * 1000, 3) if isinstance(v, float) and k != "n" else v) for k, v in stats.items()}


def run_bench(proc_request: Any, n: int, concurrency: int) -> dict[str, Any]:
    result = proc_request("POST", "/bench", {"n": n, "concurrency": concurrency}, timeout_s=300)
    return dict(result)


def measure_commits(cluster: ProcCluster, args: argparse.Namespace) -> dict[str, Any]:
    leader = cluster.leader()
    follower = next(i for i in cluster.ids if i != leader)
    lead = cluster.procs[leader]
    run_bench(lead.request, 200, 1)  # warm up
    out: dict[str, Any] = {}
    single = run_bench(lead.request, args.commits, 1)
    out["latency_leader_ms"] = ms(percentiles(single["latencies_s"], 6))
    forwarded = run_bench(cluster.procs[follower].request, args.commits, 1)
    out["latency_forwarded_ms"] = ms(percentiles(forwarded["latencies_s"], 6))
    out["throughput"] = {}
    for concurrency in (1, 10, 100):
        before = lead.status()["counters"]["fsyncs"]  # type: ignore[index]
        result = run_bench(lead.request, args.throughput_n, concurrency)
        after = lead.status()["counters"]["fsyncs"]  # type: ignore[index]
        committed = len(result["latencies_s"])
        out["throughput"][concurrency] = {
            "commits_per_s": round(result["rate"], 1),
            "errors": result["errors"],
            "latency_ms": ms(percentiles(result["latencies_s"], 6)),
            "leader_fsyncs_per_commit": round((after - before) / max(committed, 1), 3),
        }
    return out


def measure_reelection(cluster: ProcCluster, trials: int) -> dict[str, Any]:
    times: list[float] = []
    for _ in range(trials):
        leader = cluster.leader(timeout_s=20)
        # Let the cluster settle (everyone fresh) so each trial starts alike.
        wait_for(
            "all fresh",
            lambda: all((s := p.status()) and s["fresh"] for p in cluster.procs.values()),
            timeout_s=20,
        )
        survivors = [p for i, p in cluster.procs.items() if i != leader]
        t0 = time.monotonic()
        cluster.kill(leader, signal.SIGKILL)
        while True:
            if any((s := p.status()) and s["role"] == "leader" for p in survivors):
                break
            if time.monotonic() - t0 > 30:
                raise RuntimeError("no new leader within 30 s")
            time.sleep(0.005)
        times.append(time.monotonic() - t0)
        cluster.start(leader)
    return {
        "trials": trials,
        "min_ms": round(min(times) * 1000),
        "median_ms": round(statistics.median(times) * 1000),
        "max_ms": round(max(times) * 1000),
        "all_ms": [round(t * 1000) for t in times],
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "raft_engine", "machine": machine(), "quiet_wait": args.quiet_wait}
    timings = RaftTimings()
    with ProcCluster(workdir / "commits", timings=timings) as cluster:
        cluster.start_all()
        result["commits"] = measure_commits(cluster, args)
    result["reelection"] = {}
    for name, (lo, hi) in {"defaults_0.4_0.8": (0.4, 0.8), "pysyncobj_like_0.3_0.6": (0.3, 0.6)}.items():
        t = replace(timings, election_timeout_min_s=lo, election_timeout_max_s=hi)
        with ProcCluster(workdir / f"reelect-{name}", timings=t) as cluster:
            cluster.start_all()
            result["reelection"][name] = measure_reelection(cluster, args.trials)
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    c = result["commits"]
    print("commit latency (ms), one proposal at a time, fsync on:")
    print_table(
        ["path", "n", "p50", "p99", "max"],
        [
            [name, s["n"], s["p50"], s["p99"], s["max"]]
            for name, s in (("leader", c["latency_leader_ms"]), ("via a follower", c["latency_forwarded_ms"]))
        ],
    )
    print()
    print("throughput (proposals in flight on the leader):")
    print_table(
        ["in flight", "commits/s", "p50 ms", "p99 ms", "fsyncs/commit"],
        [
            [
                str(k),
                v["commits_per_s"],
                v["latency_ms"]["p50"],
                v["latency_ms"]["p99"],
                v["leader_fsyncs_per_commit"],
            ]
            for k, v in c["throughput"].items()
        ],
    )
    print()
    print("re-election after SIGKILL of the leader (ms):")
    print_table(
        ["timeouts", "trials", "min", "median", "max"],
        [[k, v["trials"], v["min_ms"], v["median_ms"], v["max_ms"]] for k, v in result["reelection"].items()],
    )
    print(f"load average at the end: {result['machine']['loadavg']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--throughput-n", type=int, default=3000)
    ap.add_argument("--trials", type=int, default=10)
    add_common_args(ap)
    execute("raft-engine", ap.parse_args(), run)


if __name__ == "__main__":
    main()
