"""The embedded consensus engine under the faults issue 12 reproduced, with real agents.

Each test plays one of the reviews' reproductions against three agent processes and
checks every moment of it (the recorder samples every few milliseconds), not only where
it ends:

- ghost commits: a leader cut off with writes in flight, the majority moving on past a
  snapshot, then the heal: the ex-leader never serves what the majority never committed;
- a hostile frame on the Raft port: the agent keeps deciding and serving, fresh;
- a damaged journal: detected, said once, healed from the leader;
- a full disk: said, writes refused, the last decision served stale, recovery by itself;
- a restarted or rejoining agent never serves less than it served, nor calls an old
  decision fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.testing.localcluster import LocalCluster

from .conftest import FAULT_TIMEOUT_S, READY_TIMEOUT_S, Recorder, StartCluster, fast_config, leader_of

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(300)]


def content(d: dict[str, Any]) -> tuple[Any, ...]:
    """What a decision says, without who served it or when it was asked."""
    return (d["epoch"], d["revision"], d["services"], d["features"], d["intent_seq"], d["reasons"])


def one_content_per_revision(rec: Recorder) -> dict[int, tuple[Any, ...]]:
    seen: dict[int, tuple[Any, ...]] = {}
    for s in rec.samples:
        if s.decision is None:
            continue
        c = content(s.decision)
        first = seen.setdefault(s.decision["revision"], c)
        assert first == c, f"two contents for revision {s.decision['revision']} (one served by {s.agent})"
    return seen


async def post_intent(c: LocalCluster, agent: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await c.post(agent, "/v1/intents", body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- 1 and 2: ghost commits, and nothing applied is ever replaced -------------------------


async def test_a_deposed_leader_never_serves_what_the_majority_did_not_commit(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    config = fast_config()
    config["backend"] = {"kind": "raft", "raft": {"snapshot_entries": 20}}
    c = await cluster(config, with_proxies=True)
    assert c.mesh is not None
    old = await leader_of(c)
    ghost_id = "ghost-intent-0001"
    async with Recorder(c, mode="poll", interval_s=0.005) as rec:
        c.mesh.isolate(old, "blackhole")
        # Written on the leader the instant it is cut off: appended there, never committed.
        ghost = asyncio.create_task(
            post_intent(c, old, {"kind": "freeze", "reason": "ghost", "id": ghost_id})
        )
        new = await c.wait_leader(FAULT_TIMEOUT_S, exclude=[old])
        for i in range(6):  # the majority moves on, well past a snapshot (every 20 entries)
            status, body = await post_intent(
                c, new, {"kind": "feature", "name": "likes", "enabled": i % 2 == 1, "reason": f"move {i}"}
            )
            assert status in (201, 202), body
        await asyncio.sleep(3.0)  # observations refresh: many more entries, snapshots taken
        healed_at = time.monotonic()
        c.mesh.heal_all()
        await c.wait_ready(READY_TIMEOUT_S)
        await asyncio.sleep(1.0)
    status, answer = await ghost
    assert status != 201, f"the cut-off leader acknowledged a write it could not commit: {answer}"
    contents = one_content_per_revision(rec)
    for agent in c.agents:
        _, _, listing = await c.get(agent, "/v1/intents")
        assert ghost_id not in {i["id"] for i in listing["intents"]}, f"{agent} serves the ghost intent"
        _, _, history = await c.get(agent, "/v1/history?limit=500")
        assert ghost_id not in {e["intent_id"] for e in history["entries"]}
    for line in c.log_of(old).splitlines():
        assert "CRITICAL" not in line, line
    measure(
        f"{len(rec.samples)} samples ({len(rec.of(old))} of the ex-leader) over {len(contents)} revisions; "
        f"converged {time.monotonic() - healed_at:.2f} s after the heal, no ghost"
    )


# -- 3: a hostile frame on the Raft port ---------------------------------------------------


async def test_an_unauthenticated_2gib_frame_does_not_freeze_an_agent(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    victim = await leader_of(c)
    proc = c.agents[victim].proc
    assert proc is not None
    rss_before = rss_kib(proc.pid)
    host, _, port = c.agents[victim].raft.rpartition(":")
    attackers: list[socket.socket] = []
    try:
        for _ in range(20):
            s = socket.create_connection((host, int(port)), timeout=2)
            s.setblocking(False)
            with contextlib.suppress(OSError):
                s.send(b"\x7f\xff\xff\xff" + b"\0" * 65536)
            attackers.append(s)
        before = (await c.decision(victim) or {})["revision"]
        status, body = await post_intent(
            c, victim, {"kind": "feature", "name": "comments", "enabled": False, "reason": "under attack"}
        )
        assert status == 201, body
        ready = await c.get(victim, "/readyz")
        assert ready[0] == 200, ready
        after = await c.decision(victim)
        assert after is not None and after["revision"] > before and not after["stale"]
    finally:
        for s in attackers:
            s.close()
    grown_mib = (rss_kib(proc.pid) - rss_before) / 1024
    measure(f"20 connections sending a 2 GiB length: the leader kept committing; RSS +{grown_mib:.1f} MiB")
    assert grown_mib < 64, f"RSS grew by {grown_mib:.0f} MiB"
    await post_intent(c, victim, {"kind": "feature", "name": "comments", "enabled": True, "reason": "over"})


# -- 5: a damaged journal ------------------------------------------------------------------


async def test_a_damaged_journal_is_reported_once_and_healed_from_the_leader(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    for i in range(5):
        await post_intent(
            c, leader, {"kind": "feature", "name": "likes", "enabled": i % 2 == 0, "reason": "x"}
        )
    assert await c.stop_agent(victim) == 0
    segments = sorted((c.agents[victim].data_dir / "raft").glob("wal-*.log"))
    assert segments, "no journal segment"
    segment = segments[-1]
    data = bytearray(segment.read_bytes())
    assert len(data) > 256
    offset = random.Random(7).randrange(64, len(data) // 2)
    data[offset : offset + 8] = os.urandom(8)
    segment.write_bytes(bytes(data))

    started = time.monotonic()
    c.start_agent(victim)
    await c.wait_ready(READY_TIMEOUT_S)
    measure(
        f"8 bytes damaged at offset {offset}: {victim} ready again after {time.monotonic() - started:.1f} s"
    )
    log = c.log_of(victim)
    damage = [
        line
        for line in log.splitlines()
        if "ERROR" in line and ("damage" in line.lower() or "damaged" in line.lower())
    ]
    assert len(damage) >= 1, "the damage was not reported"
    assert "Traceback" not in log
    decisions = await c.decisions()
    assert len({d["revision"] for d in decisions.values() if d}) == 1


# -- 6: a full disk ------------------------------------------------------------------------


async def test_a_full_disk_is_reported_and_the_agent_recovers_when_space_returns(
    cluster: StartCluster, tmp_path: Path, measure: Callable[[str], None]
) -> None:
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (CI runs as root)")
    c = await cluster()
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    assert await c.stop_agent(victim) == 0
    raft_dir = c.agents[victim].data_dir / "raft"
    saved = tmp_path / "saved-raft"
    shutil.copytree(raft_dir, saved)
    shutil.rmtree(raft_dir)
    raft_dir.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(raft_dir)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    filler = raft_dir / "filler"
    try:
        shutil.copytree(saved, raft_dir, dirs_exist_ok=True)
        c.start_agent(victim)
        await c.wait_ready(READY_TIMEOUT_S)
        # Fill the disk to the last byte.
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        for i in range(3):  # the cluster commits; the victim cannot journal it
            await post_intent(
                c, leader, {"kind": "feature", "name": "likes", "enabled": i % 2 == 0, "reason": "d"}
            )

        async def says_so() -> Any:
            _, _, view = await c.get(victim, "/v1/cluster")
            problems = " ".join(view.get("problems", [])) if isinstance(view, dict) else ""
            return "disk" in problems and not view["has_quorum"]

        await c.wait_for(says_so, FAULT_TIMEOUT_S, f"{victim} to report its full disk")
        status, _, body = await c.get(victim, "/v1/decision")
        assert status == 200 and body["stale"] is True, "the last decision is still served, marked stale"
        ready, _, _ = await c.get(victim, "/readyz")
        assert ready == 503
        assert c.agents[victim].alive, "no SIGBUS, no exit"
        freed = time.monotonic()
        filler.unlink()
        await c.wait_ready(READY_TIMEOUT_S)
        measure(f"disk full then freed: {victim} fresh again {time.monotonic() - freed:.1f} s after")
    finally:
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
        await c.stop_agent(victim, signal.SIGKILL)
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(raft_dir)], check=False)


# -- 8: restarts and rejoins ---------------------------------------------------------------


async def test_a_restarted_agent_never_serves_less_than_before_nor_an_old_decision_as_fresh(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    for i in range(3):
        await post_intent(
            c, leader, {"kind": "feature", "name": "likes", "enabled": i % 2 == 0, "reason": "r"}
        )
    await c.wait_ready(READY_TIMEOUT_S)
    served_before = (await c.decision(victim) or {})["revision"]
    c.kill_agent(victim, signal.SIGKILL)
    for i in range(3):  # the cluster moves on while it is down
        await post_intent(
            c, leader, {"kind": "feature", "name": "comments", "enabled": i % 2 == 1, "reason": "r"}
        )
    current = (await c.decision(leader) or {})["revision"]
    async with Recorder(c, [victim], mode="poll", interval_s=0.005) as rec:
        c.start_agent(victim)
        await c.wait_ready(READY_TIMEOUT_S)
    answers = [s for s in rec.of(victim) if s.decision is not None]
    assert answers, "the restarted agent never answered"
    lowest = min(s.revision for s in answers if s.revision is not None)
    assert lowest >= served_before, f"served revision {lowest} after serving {served_before} before its kill"
    for s in answers:
        if not s.stale:
            assert s.revision is not None and s.revision >= current, (
                f"revision {s.revision} called fresh while the cluster was at {current}"
            )
    measure(f"{len(answers)} answers after restart: never below {served_before}, fresh only at {current}+")


async def test_a_rejoining_agent_calls_nothing_fresh_before_it_caught_up(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster(with_proxies=True)
    assert c.mesh is not None
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    c.mesh.isolate(victim, "blackhole")

    async def says_stale() -> bool:
        d = await c.decision(victim)
        return d is not None and bool(d["stale"])

    # Within its freshness window (1 s) after its last confirmation an agent may still call
    # its decision fresh: that is the bound it promises. Past it, cut off, it is stale.
    await c.wait_for(says_stale, FAULT_TIMEOUT_S, f"{victim} to say it is stale")
    for i in range(4):
        await post_intent(
            c, leader, {"kind": "feature", "name": "likes", "enabled": i % 2 == 0, "reason": "p"}
        )
    current = (await c.decision(leader) or {})["revision"]
    async with Recorder(c, [victim], mode="poll", interval_s=0.005) as rec:
        c.mesh.heal_all()
        await c.wait_ready(READY_TIMEOUT_S)
    answers = [s for s in rec.of(victim) if s.decision is not None]
    fresh = [s for s in answers if not s.stale]
    assert fresh, "it never became fresh again"
    for s in fresh:
        assert s.revision is not None and s.revision >= current, (
            f"called revision {s.revision} fresh (cluster at {current})"
        )
    measure(f"rejoined after {current} revisions: {len(answers)} answers, stale until caught up")
