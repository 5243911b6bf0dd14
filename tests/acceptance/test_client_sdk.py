"""The application client keeps serving the last known flags when every agent is gone."""

from __future__ import annotations

import signal

import pytest

from controlplane.client import FlagsClient
from controlplane.testing.localcluster import LocalCluster, remap_ports
from tests.api.conftest import api_config

pytestmark = [pytest.mark.acceptance]


async def test_client_follows_changes_and_keeps_last_known_flags_when_agents_die() -> None:
    async with LocalCluster(remap_ports(api_config())) as c:
        await c.wait_ready(60)
        await c.settled()
        agents = list(c.agents)
        async with FlagsClient([c.agents[a].url for a in agents], wait_s=2, backoff_max_s=0.5) as flags:
            assert await flags.wait_for_revision(0, 10)
            assert flags.enabled("comments") is True
            assert not flags.stale
            status, body = await c.post(
                agents[0],
                "/v1/intents",
                {"kind": "feature", "name": "comments", "enabled": False, "reason": "test"},
            )
            assert status == 201, body
            assert await flags.wait_for_revision(body["revision"] - 1, 10)
            assert flags.enabled("comments") is False
            assert flags.weights("order")["cn-east"] > 0
            held = flags.revision
            for a in agents:
                c.kill_agent(a, signal.SIGKILL)
            await c.wait_for(lambda: _stale(flags), 20, "the client to notice every agent is gone")
            assert flags.enabled("comments") is False, "last known good state is kept"
            assert flags.revision == held
            assert flags.enabled("no-such-flag", default=False) is False
            assert sum(flags.weights("order").values()) == 100


async def _stale(flags: FlagsClient) -> bool:
    return flags.stale
