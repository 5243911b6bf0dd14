"""The deterministic simulation (tests/raft/sim.py) over many seeds, 3 and 5 nodes.

Faults: loss, duplication, reordering, long delays, symmetric / one-way / bridge
partitions, an isolated leader, crashes that tear the last write, and damaged journals
(a node restarts recovering, having lost committed entries, sometimes its vote too).

At least 1,000,000 simulated steps in total (about 30 s on the project's machine);
`RAFT_SIM_STEPS` scales the total up for long runs. A failure names its seed; replay it
with `python -m tests.raft.sim SEED STEPS NODES`.
"""

from __future__ import annotations

import os

import pytest

from tests.raft.sim import Simulation

TOTAL_STEPS = int(os.environ.get("RAFT_SIM_STEPS", "1000000"))
SEEDS_PER_SHARD = 5
SHARDS = 10
STEPS_PER_RUN = max(1000, TOTAL_STEPS // (SHARDS * SEEDS_PER_SHARD))


@pytest.mark.parametrize("shard", range(SHARDS))
def test_simulation_safety_and_liveness(shard: int) -> None:
    total = 0
    for k in range(SEEDS_PER_SHARD):
        seed = shard * SEEDS_PER_SHARD + k
        nodes = 3 if seed % 2 == 0 else 5
        # Every run damages journals now and then (recovering mode); one in three also
        # loses both hard-state slots (vote_unknown).
        totals = Simulation(seed, nodes, damage=True, lose_votes=seed % 3 == 0).run(STEPS_PER_RUN)
        total += totals.steps
        # The faults must really have happened, or the run proves little.
        assert totals.elections >= 2, (seed, totals)
        assert totals.committed > 10, (seed, totals)
    assert total >= SEEDS_PER_SHARD * STEPS_PER_RUN


def test_simulation_exercises_every_fault() -> None:
    """Across a few seeds, crashes, snapshot installs, ReadIndex and losses all occur."""
    seen = {"crashes": 0, "snapshots_installed": 0, "reads_answered": 0, "dropped": 0, "damaged": 0}
    for seed in range(4):
        totals = Simulation(1000 + seed, 3).run(20_000)
        for key in seen:
            seen[key] += getattr(totals, key)
    assert all(v > 0 for v in seen.values()), seen
