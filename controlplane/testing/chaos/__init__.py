"""Jepsen-style chaos: seeded compound fault schedules against real agents, and a checker.

- `schedule`: a schedule is a pure function of (seed, cluster shape): replayable;
- `runner`: starts a fresh `LocalCluster` per schedule and plays it, then heals;
- `recorder`: what every agent served (polled and watched), every write, every fault;
- `history`: the recorded JSON, the checker's only input;
- `timeline`: the world (agents, links, backends) over time, replayed from the faults;
- `checker`: pure, history in, violations (with seed and step) and latencies out;
- `cli`: `python -m controlplane.testing.chaos` (what `make chaos` runs).

Backend-agnostic by construction: agents are driven only by signals, HTTP and the
network between them. See tests/chaos/README.md for the invariants and the findings.
"""
