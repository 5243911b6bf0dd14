"""Schedules are a pure function of the seed and the shape; partitions and the world replay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from controlplane.testing.chaos.history import Fault
from controlplane.testing.chaos.runner import Options, cluster_config, faketime_env, shape_of
from controlplane.testing.chaos.schedule import LEADER, Shape, coverage, generate, partition_groups
from controlplane.testing.chaos.timeline import Timeline

SHAPE = Shape(
    agents=("a1", "a2", "a3", "a4", "a5"),
    regions=("east", "south", "north"),
    services=("order", "gateway"),
    features=("comments",),
    duration_s=30.0,
)


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert generate(7, SHAPE) == generate(7, SHAPE)
    assert generate(7, SHAPE).describe() == generate(7, SHAPE).describe()
    assert generate(7, SHAPE).steps != generate(8, SHAPE).steps


def test_a_schedule_covers_the_fault_kinds_and_heals_within_its_duration() -> None:
    actions: set[str] = set()
    for seed in range(1, 40):
        schedule = generate(seed, SHAPE)
        assert all(0 <= s.at_s <= SHAPE.duration_s for s in schedule.steps)
        assert [s.index for s in schedule.steps] == list(range(len(schedule.steps)))
        assert [s.at_s for s in schedule.steps] == sorted(s.at_s for s in schedule.steps)
        actions |= {s.action for s in schedule.steps}
        # Every fault episode has its heal after it.
        opened = {s.episode: s for s in schedule.steps if s.action in ("kill", "pause", "clock", "partition")}
        for episode, start in opened.items():
            heals = [s for s in schedule.steps if s.episode == episode and s.index > start.index]
            assert heals, f"seed {seed}: episode {episode} ({start.action}) never healed"
    assert actions >= {
        "kill", "restart", "pause", "resume", "clock", "clock_heal", "partition", "heal_network",
        "backend", "backend_heal", "intent", "delete_intent", "full_stop", "full_start",
    }  # fmt: skip


def test_targets_and_offsets_are_in_range() -> None:
    for seed in range(1, 30):
        for s in generate(seed, SHAPE).steps:
            target = s.args.get("target")
            if target is not None:
                assert target in SHAPE.agents or target == LEADER or target.startswith("@episode:")
            if s.action == "clock":
                assert 3.0 <= abs(s.args["offset_s"]) <= SHAPE.max_clock_offset_s


def test_a_mix_without_a_kind_never_plays_it() -> None:
    shape = Shape(SHAPE.agents, SHAPE.regions, SHAPE.services, mix={"backend": 1.0})
    actions = {s.action for seed in range(1, 20) for s in generate(seed, shape).steps}
    assert actions == {"backend", "backend_heal"}


@pytest.mark.parametrize(
    ("kind", "n", "sizes"),
    [("majority", 3, [1, 1, 1]), ("majority", 5, [2, 2, 1]), ("halves", 5, [2, 3]), ("bridge", 5, [1, 2, 2])],
)
def test_partition_groups(kind: str, n: int, sizes: list[int]) -> None:
    groups = partition_groups(kind, [f"a{i}" for i in range(n)])
    assert [len(g) for g in groups] == sizes
    assert sorted(a for g in groups for a in g) == [f"a{i}" for i in range(n)]


def test_the_world_knows_the_majority() -> None:
    agents = ["a1", "a2", "a3"]
    cut = [["a1", "a2"], ["a2", "a1"], ["a1", "a3"], ["a3", "a1"]]
    faults = [
        Fault(at=10.0, step=0, episode=1, action="partition", args={}, resolved={"cut": cut}),
        Fault(at=12.0, step=1, episode=2, action="pause", args={}, resolved={"paused": ["a2"]}),
        Fault(at=14.0, step=2, episode=1, action="heal_network", args={}, resolved={"heal_links": True}),
        Fault(at=16.0, step=3, episode=3, action="backend", args={}, resolved={"backends": {"e/o": "503"}}),
    ]
    tl = Timeline.replay(agents, 0.0, faults)
    assert tl.at(5).majority(agents) == {"a1", "a2", "a3"}
    assert tl.at(11).majority(agents) == {"a2", "a3"}
    assert tl.at(13).majority(agents) == frozenset()  # a1 cut off, a2 stopped
    assert tl.at(15).majority(agents) == {"a1", "a3"}
    assert tl.able_since(15, settle_s=6) is None
    assert tl.able_since(21, settle_s=6) == 20
    assert tl.down_since("e", "o", 17) == 16
    assert tl.down_since("e", "o", 15) is None


def test_the_chaos_config_has_five_agents_and_tcp_aware_shape() -> None:
    config = cluster_config(5, "raft")
    shape = shape_of(config, Options(agents=5))
    assert len(shape.agents) == 5 and len(set(shape.agents)) == 5
    assert shape.regions == ("cn-east", "cn-south", "cn-north")
    etcd_shape = shape_of(cluster_config(3, "etcd", "http://127.0.0.1:1"), Options(backend="etcd"))
    assert etcd_shape.mix["partition"] == 0


@pytest.mark.parametrize("offset_s", [30.0, -30.0])
def test_libfaketime_moves_wall_time_and_keeps_intervals(offset_s: float) -> None:
    """What the clock step relies on: under `faketime_env` a Python process's wall clock is
    off by the offset, while sleeping (in a thread too, as the engine does) works and an
    interval on the monotonic clock is still the real one."""
    code = (
        "import threading, time\n"
        "t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()\n"
        "m = time.monotonic(); time.sleep(0.3); print(time.time(), time.monotonic() - m)\n"
    )
    env = {**os.environ, **faketime_env(offset_s)}
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    after = time.time()
    wall, slept = (float(x) for x in out.stdout.split())
    assert before + offset_s - 1 < wall < after + offset_s + 1
    assert 0.29 < slept < 1.0


def test_the_short_run_of_make_test_plays_every_kind_of_fault() -> None:
    """The three seeds of `test_chaos_short.py` together cover what 40 seeds cover."""
    from tests.chaos.test_chaos_short import SHORT_DURATION_S, SHORT_SEEDS

    config = cluster_config(3, "raft")
    shape = shape_of(config, Options(duration_s=SHORT_DURATION_S))
    everything = set().union(*(coverage(generate(seed, shape)) for seed in range(1, 40)))
    short = set().union(*(coverage(generate(seed, shape)) for seed in SHORT_SEEDS))
    assert {"partition:bridge", "pause:leader", "kill:leader", "clock:leader", "full_stop"} <= everything
    assert short == everything, f"the short run misses {sorted(everything - short)}"


def test_a_schedule_that_fails_to_run_is_reported_and_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runner's broad catch keeps a long run going, but never hides the failure."""
    from controlplane.testing.chaos.cli import parse_args, run_many

    args = parse_args(["--schedules", "2", "--seed", "7", "--out", str(tmp_path), "--quiet"])
    # 4 agents is no deployment the runner knows: each run fails before starting anything.
    reports, errors = asyncio.run(run_many(args, Options(agents=4)))
    assert reports == []
    assert [e.split(":", 1)[0] for e in errors] == ["seed 7", "seed 8"]
    assert "agents must be 3 or 5" in errors[0]
    out = capsys.readouterr()
    assert "the run itself failed" in out.err
    assert "2 failed to run" in out.out
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert len(summary["run_errors"]) == 2


@pytest.mark.parametrize("flagged", [True, False])
def test_a_flagged_schedule_keeps_its_agents_logs_and_a_clean_one_keeps_nothing(
    tmp_path: Path, flagged: bool
) -> None:
    from controlplane.testing.chaos.cli import keep_logs

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "seed-5" / "data" / "agent-a").mkdir(parents=True)
    (work / "seed-5" / "data" / "agent-a" / "journal").write_bytes(b"\0" * 64)
    (work / "seed-5" / "agent-a.log").write_text("raft agent-a is no longer the leader\n")
    (work / "seed-5" / "cluster.yaml").write_text("cluster: {}\n")
    (work / "etcd-5").mkdir()
    keep_logs(work, 5, out, keep=flagged)
    assert not (work / "seed-5").exists() and not (work / "etcd-5").exists()
    kept = sorted(p.name for p in (out / "seed-5-logs").iterdir()) if flagged else []
    assert kept == (["agent-a.log", "cluster.yaml"] if flagged else [])
    assert (out / "seed-5-logs").exists() is flagged
