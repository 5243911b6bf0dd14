"""A real 3-agent cluster shared by the API tests of one module (starting one costs ~2 s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports


def api_config(**policy: Any) -> dict[str, Any]:
    config = remap_ports(load_demo_config())
    config["policy"] = {**config["policy"], "recovery_hold_s": 1, "ramp_step_s": 1, **policy}
    return config


async def settled(c: LocalCluster, quiet_s: float = 2.0, timeout_s: float = 30.0) -> int:
    """Wait until the revision has not moved for `quiet_s` (start-up observations settle)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        d = await c.decision(next(iter(c.agents)))
        rev = d["revision"] if d else -1
        if rev != last:
            last, since = rev, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return rev
        await asyncio.sleep(0.1)
    raise TimeoutError(f"revision still moving after {timeout_s} s (at {last})")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[LocalCluster]:
    async with LocalCluster(api_config()) as c:
        try:
            await c.wait_ready(60)
            await settled(c)
            yield c
        finally:
            if getattr(c, "failed", False):
                for agent_id in c.agents:
                    print(f"--- {agent_id} log (tail) ---\n{c.log_of(agent_id)[-3000:]}")


@pytest.fixture
def agents(cluster: LocalCluster) -> list[str]:
    return list(cluster.agents)
