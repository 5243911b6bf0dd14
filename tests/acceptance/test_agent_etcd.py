"""Agents on the etcd backend: the same product on an existing etcd, and etcd's own faults."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.testing.etcdlocal import LocalEtcd
from tests.acceptance.conftest import (
    BASE_WEIGHTS,
    FAULT_TIMEOUT_S,
    StartCluster,
    fast_config,
    region_out,
    wait_all,
    weights,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

LEASE_TTL_S = 3


@pytest_asyncio.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[LocalEtcd]:
    async with LocalEtcd(tmp_path / "etcd") as server:
        yield server


def etcd_config(etcd: LocalEtcd) -> dict[str, Any]:
    config = fast_config()
    config["backend"] = {
        "kind": "etcd",
        "etcd": {
            "endpoints": [etcd.endpoint],
            "prefix": "/cp-test",
            "lease_ttl_s": LEASE_TTL_S,
            "timeout_s": 1.0,
        },
    }
    return config


async def test_region_down_and_back_on_etcd(
    cluster: StartCluster, etcd: LocalEtcd, measure: Callable[[str], None]
) -> None:
    c = await cluster(etcd_config(etcd))
    fault_at = time.monotonic()
    await c.fail_region("cn-east")
    out = await wait_all(c, lambda d: region_out(d, "cn-east"), "cn-east out on every agent")
    measure(f"etcd backend: cn-east down -> weight 0 on all agents in {time.monotonic() - fault_at:.2f} s")
    for d in out.values():
        quorum_said = [r for r in d["reasons"] if re.match(r"cn-east/order down: [23] of 3 observers", r)]
        assert quorum_said, d["reasons"]
    await c.heal_region("cn-east")
    await wait_all(
        c, lambda d: weights(d, "order") == BASE_WEIGHTS, "base weights back", timeout_s=FAULT_TIMEOUT_S
    )


async def test_etcd_paused_past_its_leases_agents_serve_stale_then_converge(
    cluster: StartCluster, etcd: LocalEtcd, measure: Callable[[str], None]
) -> None:
    c = await cluster(etcd_config(etcd))
    before = await wait_all(c, lambda d: True, "a decision everywhere")
    revision = next(iter(before.values()))["revision"]
    etcd.pause()
    paused_at = time.monotonic()
    try:

        async def all_stale() -> dict[str, Any] | None:
            ds = await c.decisions()
            return ds if all(d and d["_stale"] is not None for d in ds.values()) else None

        stale = await c.wait_for(all_stale, 30, "every agent marking its decision stale")
        measure(f"etcd paused -> every agent serves stale in {time.monotonic() - paused_at:.2f} s")
        for agent, d in stale.items():
            assert d is not None and d["revision"] == revision, (
                f"{agent} served a decision etcd never committed"
            )
            assert d["stale"] is True
            status, _, body = await c.get(agent, "/readyz")
            assert status == 503 and "no quorum" in body["problems"]
        await asyncio.sleep(LEASE_TTL_S + 1)  # past every lease
    finally:
        etcd.resume()
    resumed_at = time.monotonic()
    await c.wait_ready(60)
    measure(f"etcd resumed -> every agent ready on one revision in {time.monotonic() - resumed_at:.2f} s")
    # Deciding still works after every lease expired with the pause.
    await c.fail_region("cn-north")
    await wait_all(c, lambda d: region_out(d, "cn-north"), "cn-north out after the pause")


async def test_demo_runs_on_etcd(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONTROLPLANE_ADMIN_TOKEN"}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane", "demo", "--random-ports", "--backend", "etcd"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "etcd backend" in result.stdout
    assert "demo finished" in result.stdout
