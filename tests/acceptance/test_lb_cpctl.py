"""A drain issued with `cpctl` moves real traffic through HAProxy and nginx at once.

The operator's path end to end: the real `cpctl` executable commits the intent through
an agent, every agent serves the new decision, both adapters apply it, and requests
through both load balancers stop reaching the drained region; `cpctl undrain` brings
the traffic back after the ramp.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.lb_fixtures import (
    FAILED,
    SERVICE,
    HAProxy,
    Nginx,
    StartCluster,
    Traffic,
    agent_args,
    assert_split,
    backend_addresses,
    every_agent,
    latest,
    lb_config,
    order_weights,
)
from tests.acceptance.test_lb_haproxy import haproxy_adapter
from tests.acceptance.test_lb_nginx import nginx_adapter

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

CPCTL = Path(sys.executable).parent / "cpctl"


async def cpctl(endpoints: list[str], token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"CPCTL_ENDPOINT": ",".join(endpoints), "CPCTL_TOKEN": token, "PATH": "/usr/bin:/bin"}
    return await asyncio.to_thread(
        subprocess.run, [str(CPCTL), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


async def test_cpctl_drain_moves_traffic_through_haproxy_and_nginx(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config())
    agents = agent_args(c)
    endpoints = [a.url for a in c.agents.values()]
    (tmp_path / "haproxy").mkdir()
    (tmp_path / "nginx").mkdir()
    hap = HAProxy(tmp_path / "haproxy", backend_addresses(c))
    ngx = Nginx(tmp_path / "nginx", backend_addresses(c))
    await hap.start()
    await ngx.start()
    adapters = [
        haproxy_adapter(tmp_path / "haproxy", agents, hap),
        nginx_adapter(tmp_path / "nginx", agents, ngx),
    ]
    try:
        for adapter in adapters:
            adapter.start()
        async with Traffic(hap.url) as via_haproxy, Traffic(ngx.url) as via_nginx:
            result = await cpctl(
                endpoints,
                c.admin_token,
                "drain",
                FAILED,
                "--service",
                SERVICE,
                "--reason",
                "maintenance window",
                "--yes",
            )
            assert result.returncode == 0, result.stdout + result.stderr
            revision = await every_agent(
                c,
                lambda d: d["services"][SERVICE][FAILED]["state"] == "drained",
                "cn-east/order drained on every agent",
            )
            for adapter in adapters:
                await adapter.applied(revision, "the drain")
            drained = order_weights(await latest(c))
            assert drained[FAILED] == 0
            for name, traffic in (("haproxy", via_haproxy), ("nginx", via_nginx)):
                counts = await traffic.window(3.0)
                assert counts[FAILED] == 0, f"{name} still sends to the drained region: {dict(counts)}"
                assert_split(counts, drained, f"{name} after cpctl drain")
            measure("cpctl drain: both load balancers stopped sending to cn-east")

            result = await cpctl(
                endpoints, c.admin_token, "undrain", FAILED, "--service", SERVICE, "--reason", "done", "--yes"
            )
            assert result.returncode == 0, result.stdout + result.stderr
            base = await every_agent(
                c, lambda d: d["services"][SERVICE][FAILED]["weight"] == 40, "cn-east/order fully ramped back"
            )
            for adapter in adapters:
                await adapter.applied(base, "the undrain")
            for name, traffic in (("haproxy", via_haproxy), ("nginx", via_nginx)):
                counts = await traffic.window(3.0)
                assert counts[FAILED] > 0, f"{name} sends nothing to cn-east after undrain: {dict(counts)}"
    finally:
        for adapter in adapters:
            await adapter.stop()
        await hap.stop()
        await ngx.stop()
