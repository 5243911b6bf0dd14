"""Every benchmark runs end to end at a tiny size and writes well-formed JSON with every field.

Sizes are tiny (one trial, ten watchers, a second of wrk, a few seconds of soak) and
nothing asserts on a timing: timings belong in `bench/`. What is checked is that each
command exits 0, cleans up, and writes the JSON its README section and the lead's
tables rely on. A peer that is not installed fails the test naming the Debian package;
nothing is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
BINARIES = {
    "failover": [
        ("redis-server", "redis-server"),
        ("redis-sentinel", "redis-sentinel"),
        ("haproxy", "haproxy"),
    ],
    "api": [("wrk", "wrk"), ("nginx", "nginx")],
    "probes_under_load": [("wrk", "wrk")],
}
PERCENTILES = {"n", "min", "p50", "p95", "p99", "max", "mean"}


def require(benchmark: str) -> None:
    for name, package in BINARIES.get(benchmark, []):
        found = shutil.which(name) or any(
            os.access(f"{d}/{name}", os.X_OK) for d in ("/usr/sbin", "/usr/bin")
        )
        if not found:
            pytest.fail(f"{name} is not installed: apt-get install -y {package}")


def run_bench(benchmark: str, tmp_path: Path, *args: str, timeout_s: float = 120) -> dict[str, Any]:
    require(benchmark)
    out = tmp_path / f"{benchmark}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{benchmark}", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench.{benchmark} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["benchmark"] == benchmark
    assert set(data["machine"]) >= {
        "cores",
        "cpu",
        "python",
        "loadavg",
        "at",
        "commit",
        "product_code_modified",
    }
    assert len(data["load_before"]) == 3 and len(data["load_after"]) == 3
    assert "quiet_wait" in data
    return data


def check_percentiles(p: dict[str, Any], n: int | None = None) -> None:
    assert set(p) == PERCENTILES, p
    if n is not None:
        assert p["n"] == n, p
    if p["n"]:
        assert p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"], p


def test_failover(tmp_path: Path) -> None:
    data = run_bench(
        "failover", tmp_path, "--trials", "1", "--recovery-hold-s", "0.5", "--ramp-step-s", "0.5"
    )
    assert set(data["settings"]) >= {
        "trials",
        "agents",
        "probe_interval_s",
        "fall",
        "rise",
        "wan_delay_ms",
        "fault",
    }
    (ours,) = data["trials"]["ours"]
    stages = ("detect_first", "detect_quorum", "committed", "served_all", "client_all")
    assert set(ours["stages_s"]) == set(stages)
    assert all(isinstance(ours["stages_s"][s], float) and ours["stages_s"][s] > 0 for s in stages), ours
    assert ours["stages_s"]["detect_first"] <= ours["stages_s"]["committed"] <= ours["stages_s"]["client_all"]
    assert set(ours["recovery_s"]) == {"verdict_up", "weight_back_all", "full_weight_all", "hold_overhead"}
    for stage in stages:
        check_percentiles(data["summary"]["ours"][stage], n=1)
    for stage in ("verdict_up", "weight_back_all", "full_weight_all", "hold_overhead"):
        check_percentiles(data["summary"]["recovery"][stage], n=1)
    (sentinel,) = data["trials"]["sentinel"]
    assert set(sentinel) >= {"sdown_s", "odown_s", "switch_master_first_s", "switch_master_all_s", "total_s"}
    assert sentinel["sdown_s"] <= sentinel["switch_master_first_s"] == sentinel["total_s"]
    (haproxy,) = data["trials"]["haproxy"]
    assert haproxy["total_s"] > 0 and haproxy["recovery_s"] > 0
    for peer in ("sentinel", "haproxy"):
        check_percentiles(data["summary"][peer]["total_s"], n=1)
        r = data["ratios"][peer]
        assert len(r["per_trial"]) == 1 and r["ratio_of_medians"] > 0 and r["median_of_ratios"] > 0
    assert set(data["targets"]) == {
        "total_p99_s",
        "total_p99_target_s",
        "total_p99_met",
        "ours_over_sentinel_met",
        "ours_over_haproxy_met",
    }


def test_watch(tmp_path: Path) -> None:
    data = run_bench("watch", tmp_path, "--watchers", "10", "--rounds", "1", "--hold-s", "0.5")
    assert [(r["kind"], r["watchers"]) for r in data["results"]] == [("blocking", 10), ("sse", 10)]
    for r in data["results"]:
        assert r["missed"] == 0
        check_percentiles(r["latency_ms"], n=10)
        assert set(r["agent"]) == {
            "rss_mb_before",
            "rss_mb_holding",
            "rss_mb_peak",
            "rss_mb_after",
            "fds_holding",
            "threads_holding",
            "cpu_percent_idle_hold",
            "cpu_s_rounds",
            "cpu_s_per_round",
        }
        assert r["agent"]["rss_mb_holding"] > 0 and r["agent"]["fds_holding"] >= 10
        assert len(r["per_round"]) == 1
    assert set(data["targets"]) >= {"p99_ms", "p99_met", "rss_mb_peak", "rss_met"}


def test_probes_under_load(tmp_path: Path) -> None:
    data = run_bench(
        "probes_under_load",
        tmp_path,
        *("--watchers", "10", "--minutes", "0.05", "--threads", "1", "--connections", "2"),
        *("--commit-every-s", "1"),
    )
    assert data["wrk"]["requests"] > 0 and data["commits"] >= 1
    assert data["agents"]["loaded"]["agent"] != data["agents"]["idle"]["agent"]
    for role in ("loaded", "idle"):
        a = data["agents"][role]
        assert a["observations"] > 0, a
        assert {"false_down", "impaired", "inconclusive", "false_down_examples"} <= set(a)
        check_percentiles(a["latency_ms"])
        assert a["probe_counters"]["probes"] > 0 and a["probe_counters"]["mean_probe_ms"] > 0
    assert set(data["targets"]) >= {"false_down", "false_down_met", "latency_p50_delta_ms", "latency_met"}


def test_api(tmp_path: Path) -> None:
    data = run_bench("api", tmp_path, "--duration", "1", "--repeat", "1", "--connections", "8")
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        assert run["rps"] > 0 and run["requests"] > 0
        assert set(run["latency_ms"]) == {"p50", "p75", "p90", "p99"}
    for endpoint in ("decision", "weights"):
        s = data["summary"][endpoint]
        assert s["bytes"] > 0
        for server in ("agent", "nginx"):
            assert s[server]["rps_median"] > 0 and s[server]["errors"] == 0
        assert s["rps_ratio_agent_over_nginx"] > 0
    assert set(data["targets"]) == {"decision_rps_target", "decision_rps", "decision_rps_met"}


def test_soak(tmp_path: Path) -> None:
    data = run_bench(
        "soak",
        tmp_path,
        "--minutes",
        "0.15",
        "--sample-s",
        "1",
        "--watchers",
        "10",
        "--intent-every-s",
        "1",
        "--flap-every-s",
        "3",
    )
    assert set(data["agents"]) == {"agent-east-1", "agent-south-1", "agent-north-1"}
    for agent, summary in data["agents"].items():
        assert summary["watchers_after_drain"] == 0, agent
        for key in ("rss_mb", "threads", "fds"):
            g = summary["growth"][key]
            assert set(g) >= {"samples", "first", "last", "growth_percent", "per_30min_percent"}
            assert g["samples"] >= 4 and g["first"] > 0
        assert len(data["samples"][agent]) >= 6
    assert data["counters"]["connects"] > 0 and data["counters"]["intents"] > 0
    assert data["limitations"]


def test_blackhole(tmp_path: Path) -> None:
    data = run_bench("blackhole", tmp_path, "--trials", "2", timeout_s=240)
    assert set(data["summary"]["all"]) >= PERCENTILES
    assert len(data["trials"]) == 2
    assert all(t["client_all"] > 0 and "victim_was_leader" in t for t in data["trials"])
    assert data["target_s"] == pytest.approx(data["detection_window_s"] + 1.0)


def test_raft_engine(tmp_path: Path) -> None:
    data = run_bench("raft_engine", tmp_path, "--commits", "20", "--throughput-n", "60", "--trials", "1")
    assert set(data["commits"]["latency_leader_ms"]) >= {"n", "p50", "p99"}
    assert data["commits"]["throughput"]
    assert set(data["reelection"]) == {"defaults_0.4_0.8", "pysyncobj_like_0.3_0.6"}


def test_flags(tmp_path: Path) -> None:
    data = run_bench("flags", tmp_path, "--rounds", "2", "--checks", "1000")
    assert set(data["propagation_ms"]) == {
        "commit_s",
        "ofrep-single",
        "ofrep-bulk",
        "flags-client",
        "provider",
    }
    for reader, p in data["propagation_ms"].items():
        assert set(p) >= PERCENTILES and p["n"] == 2, reader
    assert len(data["rounds"]) == 2
    assert data["shedder_check_us"] > 0


def test_scale(tmp_path: Path) -> None:
    data = run_bench(
        "scale",
        tmp_path,
        *("--regions", "4", "--services", "3", "--agents", "3"),
        *("--quiet-s", "3", "--settle-s", "1", "--intents", "4", "--trials", "1"),
        timeout_s=240,
    )
    assert set(data["settings"]) >= {"regions", "services", "agents", "observation_ttl_s", "refresh_s"}
    for name, pairs, agents in (("scale", 12, 3), ("baseline", 9, 3)):
        run = data[name]
        assert run["pairs"] == pairs and run["agents"] == agents, name
        q = run["quiet"]
        assert set(q) >= {
            "seconds",
            "agents",
            "leader",
            "commits_per_s",
            "decisions",
            "observations_published_per_s",
            "leader_raft_bytes_out_per_s",
            "leader_bytes_per_observation",
            "cpu_percent_max",
            "rss_mb_max",
            "harness_cpu_percent",
            "machine_busy_percent",
        }, name
        assert len(q["agents"]) == agents and q["leader"] in q["agents"]
        for agent, a in q["agents"].items():
            assert a["rss_mb"] > 0 and a["cpu_percent"] >= 0 and a["probes_per_s"] > 0, (name, agent)
            assert a["raft"]["sockets"] > 0 and a["raft"]["bytes_out_per_s"] > 0, (name, agent)
            assert {"segments_out_per_s", "segments_in_per_s", "bytes_in_per_s"} <= set(a["raft"])
            assert "observations_published_per_s" in a
        check_percentiles(run["commit"]["latency_ms"], n=4)
    trials = data["scale"]["failover_trials"]
    assert [(t["scope"], t["trial"]) for t in trials] == [("pair", 0), ("region", 0)]
    for scope in ("pair", "region"):
        for stage in ("client_all", "committed"):
            check_percentiles(data["scale"]["failover"][scope][stage], n=1)
    assert data["baseline"]["failover_trials"] == []
    assert set(data["targets"]) == {
        "failover_p99_target_s",
        "failover_pair_p99_s",
        "failover_region_p99_s",
        "failover_pair_met",
        "failover_region_met",
        "cpu_percent_target",
        "cpu_percent_max",
        "cpu_met",
    }
    assert data["targets"]["failover_p99_target_s"] == pytest.approx(data["detection_window_s"] + 0.5)
