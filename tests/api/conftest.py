"""The in-process API tier: every agent of the demo config in the test's own process.

Real `Node`s serving the real HTTP application on loopback ports, with their real
decide loops, over the in-memory consensus backend (`controlplane.testing.inprocess`).
Starting one takes well under a second; tests that need agent processes, real probes or
faults between agents live in `tests/acceptance`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from controlplane.config import Settings, parse_settings
from controlplane.testing.inprocess import InProcessCluster
from controlplane.testing.localcluster import load_demo_config


def api_config(**policy: Any) -> dict[str, Any]:
    """The demo config with short holds and ramps, so recoveries fit in a test."""
    config = load_demo_config()
    config["policy"] = {**config["policy"], "recovery_hold_s": 1, "ramp_step_s": 1, **policy}
    return config


def api_settings(config: dict[str, Any] | None = None) -> Settings:
    return parse_settings(config or api_config(), source="tests/api")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[InProcessCluster]:
    async with InProcessCluster(api_settings()) as c:
        await c.settled(quiet_s=0.5)
        yield c


@pytest.fixture
def agents(cluster: InProcessCluster) -> list[str]:
    return list(cluster.agents)


def since(t0: float) -> float:
    return time.monotonic() - t0
