"""Given real agents and a real HAProxy driven by `controlplane lb haproxy`, traffic follows.

The adapter runs as its own process and talks to HAProxy only through the runtime API
socket. HAProxy has no health checks and no redispatch here, and starts every server at
the same weight, so whatever moves traffic is the adapter.

A drain issued with `cpctl` moving traffic through both load balancers is in
`test_lb_cpctl.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.lb.haproxy import ServerState
from tests.acceptance.lb_fixtures import (
    FAILED,
    SERVICE,
    Adapter,
    HAProxy,
    StartCluster,
    Traffic,
    agent_args,
    assert_split,
    backend_addresses,
    eventually,
    every_agent,
    failover_and_recovery,
    latest,
    lb_config,
    order_weights,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


def haproxy_adapter(workdir: Path, agents: list[str], hap: HAProxy, *extra: str) -> Adapter:
    args = [*agents, "--socket", str(hap.socket), "--map", str(hap.map_file()), "--reconcile-interval", "1"]
    return Adapter("haproxy", workdir, [*args, *extra])


async def test_traffic_through_haproxy_follows_failover_and_recovery(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config())
    hap = HAProxy(tmp_path, backend_addresses(c))
    await hap.start()
    adapter = haproxy_adapter(tmp_path, agent_args(c), hap)
    try:
        adapter.start()
        await failover_and_recovery(c, hap.url, adapter, measure, "haproxy")
    finally:
        await adapter.stop()
        await hap.stop()


async def test_weights_are_put_back_after_haproxy_restarts(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config())
    hap = HAProxy(tmp_path, backend_addresses(c))
    await hap.start()
    adapter = haproxy_adapter(tmp_path, agent_args(c), hap)
    try:
        adapter.start()
        await c.fail_region(FAILED)
        revision = await every_agent(
            c, lambda d: d["services"][SERVICE][FAILED]["state"] == "down", "cn-east/order down"
        )
        await adapter.applied(revision, "the failover")
        desired = order_weights(await latest(c))

        def matches(live: dict[str, ServerState]) -> bool:
            return all(live[r].weight == w and live[r].maint == (w == 0) for r, w in desired.items())

        assert matches(await hap.servers_state())

        # A restart brings back the configuration file's settings: every server ready
        # at weight 10, cn-east included. The adapter must notice and put them back.
        restarted_at = time.monotonic()
        await hap.restart()

        async def reapplied() -> bool:
            return matches(await hap.servers_state())

        await eventually(reapplied, "the decision's weights back in the restarted HAProxy")
        measure(f"haproxy restarted -> weights re-applied in {time.monotonic() - restarted_at:.2f} s")
        log = adapter.log()
        assert "HAProxy no longer has what was applied" in log or "reachable again" in log, log[-3000:]

        async with Traffic(hap.url) as traffic:
            assert_split(await traffic.window(3), desired, "after the HAProxy restart")
    finally:
        await adapter.stop()
        await hap.stop()
