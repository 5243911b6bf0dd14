"""The short chaos run of `make test`: a few seeded schedules against real agents.

Each schedule starts a fresh 3-agent cluster on the raft backend (the project's own
engine) with a fault proxy on every Raft link, plays the schedule of its seed with the
full fault mix, heals, and the checker judges the recorded history. A failure prints
every violation with its seed and step; replay one with
`make chaos SEED=<seed> SCHEDULES=1 DURATION=15` (the schedule is printed first).

The seeds are chosen so that together they play every kind of fault the generator
knows: SIGKILL and SIGTERM of an agent and of the leader, SIGSTOP of the leader, a clock
offset on the leader, every partition kind in both modes, every backend fault, every
intent kind with client ids, retries and deletes, and a full-cluster restart
(`test_schedule.py` checks that they still do).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.testing.chaos.checker import check
from controlplane.testing.chaos.cli import describe
from controlplane.testing.chaos.history import dumps
from controlplane.testing.chaos.runner import Options, run_schedule
from controlplane.testing.chaos.schedule import DEFAULT_MIX

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]

SHORT_SEEDS = (8, 10, 12)
SHORT_DURATION_S = 15.0
SEEDS = [int(s) for s in os.environ.get("CHAOS_SHORT_SEEDS", ",".join(map(str, SHORT_SEEDS))).split(",")]
DURATION_S = float(os.environ.get("CHAOS_SHORT_DURATION", str(SHORT_DURATION_S)))


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_schedule_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    options = Options(agents=3, backend="raft", duration_s=DURATION_S, mix=DEFAULT_MIX, workdir=tmp_path)
    history = await run_schedule(seed, options)
    report = check(history)
    (tmp_path / f"seed-{seed}.json").write_bytes(dumps(history))
    assert report["stats"]["reads"] > 0 and report["stats"]["faults"] > 0
    problems = "\n".join(describe(v) for v in report["violations"])
    assert not report["violations"], f"history in {tmp_path}:\n{problems}"
