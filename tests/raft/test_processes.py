"""The engine alone in real processes (tests/raft/kvnode.py): kill -9, restart, partition, EMFILE."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from controlplane.raft.settings import RaftTimings
from controlplane.raft.transport import split_host_port
from tests.raft.harness import FAST, MeshThread, ProcCluster, proc_cluster, wait_for


def put(cluster: ProcCluster, node: str, key: str, value: str, retry_s: float = 10.0) -> dict[str, object]:
    """Write through `node`; retried while leadership moves (NoLeader/NotLeader say nothing
    was written)."""
    deadline = time.monotonic() + retry_s
    while True:
        answer = cluster.procs[node].request("POST", "/put", {"key": key, "value": value})
        if "index" in answer:
            return dict(answer)
        if answer.get("error") not in ("NoLeaderError", "NotLeaderError") or time.monotonic() > deadline:
            raise AssertionError(answer)
        time.sleep(0.05)


def test_kill_9_of_the_leader_elects_another_and_writes_continue(tmp_path: Path) -> None:
    with proc_cluster(tmp_path) as cluster:
        cluster.start_all()
        leader = cluster.leader()
        for k in range(10):
            put(cluster, leader, f"k{k}", "before")
        cluster.kill(leader)
        survivors = tuple(i for i in cluster.ids if i != leader)
        new = cluster.leader(among=survivors)
        assert new != leader
        other = next(i for i in survivors if i != new)
        # Through a follower: forwarded to the new leader.
        assert put(cluster, other, "after", "kill")["index"]
        answer = cluster.procs[new].request("GET", "/get?key=k9")
        assert answer == {"value": "before"}


def test_restarted_follower_never_serves_less_and_is_fresh_only_after_catching_up(tmp_path: Path) -> None:
    with proc_cluster(tmp_path) as cluster:
        cluster.start_all()
        leader = cluster.leader()
        victim = next(i for i in cluster.ids if i != leader)
        for k in range(30):
            put(cluster, leader, f"k{k}", "v")
        served = wait_for(
            "victim applied", lambda: (s := cluster.procs[victim].status()) and s["applied"] >= 31 and s
        )
        before = served["applied"]
        cluster.kill(victim)
        for k in range(30, 230):
            put(cluster, leader, f"k{k}", "v")
        target = cluster.procs[leader].status()["commit"]  # type: ignore[index]
        proc = cluster.start(victim)
        samples = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = proc.status()
            if st is not None:
                samples.append((st["applied"], st["fresh"]))
                if st["fresh"] and st["applied"] >= target:
                    break
            time.sleep(0.005)
        assert samples, "no status after the restart"
        assert not samples[0][1], "fresh before any confirmation after a restart"
        assert min(applied for applied, _ in samples) >= before
        assert all(applied >= target for applied, fresh in samples if fresh)
        assert samples[-1] == (target, True) or samples[-1][0] >= target


def test_leader_cut_off_from_both_followers_steps_down_within_an_election_timeout(tmp_path: Path) -> None:
    ids = ("a", "b", "c")
    probe = ProcCluster(tmp_path, ids=ids)  # only for its port choice
    mesh = MeshThread(probe.peers)
    try:
        dial = mesh.do(mesh.mesh.dial_maps)
        with proc_cluster(tmp_path, ids=ids, dial=dial) as cluster:
            cluster.peers = probe.peers
            cluster.start_all()
            leader = cluster.leader()
            put(cluster, leader, "k", "v")
            mesh.do(lambda: mesh.mesh.isolate(leader, "blackhole"))
            t0 = time.monotonic()
            wait_for(
                "the isolated leader to step down",
                lambda: (s := cluster.procs[leader].status()) is not None and s["role"] != "leader",
                timeout_s=10,
            )
            took = time.monotonic() - t0
            # Check-quorum acts after one election timeout (plus a tick); generous for a noisy host.
            assert took < FAST.election_timeout_min_s * 2 + 1.0, took
            survivors = tuple(i for i in ids if i != leader)
            new = cluster.leader(among=survivors)
            assert put(cluster, new, "k2", "v2")["index"]
            mesh.do(mesh.mesh.heal_all)
            wait_for(
                "the old leader rejoins", lambda: (s := cluster.procs[leader].status()) and s["fresh"], 15
            )
    finally:
        mesh.close()


def test_emfile_on_accept_is_survived_and_peers_get_back_in(tmp_path: Path) -> None:
    timings = RaftTimings(
        election_timeout_min_s=0.3, election_timeout_max_s=0.6, heartbeat_s=0.05, handshake_timeout_s=5.0
    )
    limits = {"max_unauthenticated": 1000, "max_connections": 2000}
    with proc_cluster(tmp_path, timings=timings, limits=limits) as cluster:
        cluster.start("a", prefix=["prlimit", "--nofile=48:48"])
        cluster.start("b")
        cluster.start("c")
        cluster.leader()
        flood: list[socket.socket] = []
        try:
            for _ in range(120):
                try:
                    flood.append(socket.create_connection(split_host_port(cluster.peers["a"]), timeout=2))
                except OSError:
                    break
            wait_for(
                "a to log EMFILE", lambda: "cannot accept" in cluster.procs["a"].log_text(), timeout_s=10
            )
            assert "Too many open files" in cluster.procs["a"].log_text()
        finally:
            for s in flood:
                s.close()
        # b restarts: it must be able to connect to a again.
        cluster.kill("b")
        cluster.start("b")
        wait_for(
            "a accepts b again",
            lambda: (
                (s := cluster.procs["a"].status()) is not None
                and any(m["id"] == "b" and m["connected_in"] for m in s["members"])
            ),
            timeout_s=15,
        )
        wait_for("a fresh", lambda: (s := cluster.procs["a"].status()) and s["fresh"], timeout_s=15)
        assert put(cluster, "a", "after-emfile", "ok")["index"]
