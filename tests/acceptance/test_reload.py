"""Given a running agent, when its file changes and it gets SIGHUP, then what can change
live is applied, what needs a restart is refused, and a bad file changes nothing.

SIGHUP used to kill the agent (the default action).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.testing.localcluster import LocalCluster
from tests.acceptance.conftest import StartCluster, fast_config

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

GRAFANA = "grafana-read-token-0123456789"


async def status(cluster: LocalCluster, token: str | None) -> int:
    agent = next(iter(cluster.agents.values()))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(agent.url + "/v1/decision", headers=headers) as r:
        return r.status


async def hup_and_wait_for(cluster: LocalCluster, text: str, count: int = 1) -> None:
    agent_id, agent = next(iter(cluster.agents.items()))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while cluster.log_of(agent_id).count(text) < count:
        assert agent.alive, cluster.log_of(agent_id)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{cluster.log_of(agent_id)[-3000:]}"
        await asyncio.sleep(0.2)


def write(cluster: LocalCluster, config: dict[str, Any] | str) -> None:
    assert cluster.config_path is not None
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    cluster.config_path.write_text(text)


async def test_sighup_applies_live_changes_and_refuses_the_rest(
    cluster: StartCluster, tmp_path: Path
) -> None:
    config = fast_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    c = await cluster(config)
    assert await status(c, None) == 200  # no read token yet: reads are open
    live = dict(c.config)
    secret = tmp_path / "grafana-token"
    secret.write_text(GRAFANA)
    live["auth"] = {
        "admin_token": {"env": "CONTROLPLANE_ADMIN_TOKEN"},
        "tokens": [{"name": "grafana", "scope": "read", "secret": {"file": str(secret)}}],
    }
    live["log_level"] = "debug"

    write(c, live)
    await hup_and_wait_for(c, "reloaded ")
    assert "auth, log_level" in c.log_of(next(iter(c.agents)))
    assert await status(c, GRAFANA) == 200
    assert await status(c, None) == 401  # a read token now exists

    write(c, "cluster: [unclosed\n")
    await hup_and_wait_for(c, "reload refused, nothing changed")
    assert await status(c, GRAFANA) == 200 and await status(c, None) == 401

    write(c, {**live, "api": {"max_watchers": 50}})
    await hup_and_wait_for(c, "reload refused, nothing changed", count=2)
    assert "api changed, which needs a restart" in c.log_of(next(iter(c.agents)))
    assert await status(c, GRAFANA) == 200
