"""Given a running agent, when its file changes and it gets SIGHUP, then what can change
live is applied, what needs a restart is refused, and a bad file changes nothing.

SIGHUP used to kill the agent (the default action).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.testing.localcluster import LocalCluster
from tests.acceptance.conftest import StartCluster, fast_config
from tests.acceptance.test_lb_cpctl import CPCTL

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


async def test_a_half_rolled_change_shows_in_the_config_hash_of_each_agent(cluster: StartCluster) -> None:
    c = await cluster(fast_config())

    async def hashes() -> dict[str, str]:
        out = {}
        for agent_id in c.agents:
            status_code, _, body = await c.get(agent_id, "/v1/cluster")
            assert status_code == 200
            out[agent_id] = body["config_hash"]
        return out

    before = await hashes()
    assert len(set(before.values())) == 1 and len(next(iter(before.values()))) == 12, before
    changed = dict(c.config)
    changed["policy"] = {**changed["policy"], "recovery_hold_s": 7.0}
    write(c, changed)
    await hup_and_wait_for(c, "reloaded ")  # the first agent only
    half = await hashes()
    first = next(iter(c.agents))
    assert half[first] != before[first] and all(half[a] == before[a] for a in c.agents if a != first), half
    env = {"CPCTL_ENDPOINT": ",".join(a.url for a in c.agents.values()), "COLUMNS": "240", "NO_COLOR": "1"}
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(CPCTL), "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"{half[first]} (differs)" in shown.stdout and f"{before[first]} (differs)" in shown.stdout, (
        shown.stdout
    )
    for agent in list(c.agents.values())[1:]:
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while len(set((await hashes()).values())) != 1:
        assert time.monotonic() < deadline, await hashes()
        await asyncio.sleep(0.2)
    assert set((await hashes()).values()) == {half[first]}


async def test_sighup_replaces_the_probes_live_and_refuses_a_new_region(cluster: StartCluster) -> None:
    config = fast_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    c = await cluster(config)
    agent_id = next(iter(c.agents))

    async def south_order() -> dict[str, Any]:
        _, _, body = await c.get(agent_id, "/v1/observations")
        (seen,) = [o for o in body["observations"] if o["region"] == "cn-south" and o["service"] == "order"]
        return dict(seen)

    assert (await south_order())["up"]
    moved = yaml.safe_load(yaml.safe_dump(c.config))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    moved["regions"]["cn-south"]["services"]["order"]["targets"] = [f"http://127.0.0.1:{dead}/healthz"]
    write(c, moved)
    await hup_and_wait_for(c, "probes reloaded")
    deadline = time.monotonic() + 30
    while (await south_order())["up"]:
        assert time.monotonic() < deadline, await south_order()
        await asyncio.sleep(0.2)
    assert "refused" in str((await south_order())["error"])

    grown = yaml.safe_load(yaml.safe_dump(moved))
    grown["regions"]["cn-west"] = grown["regions"]["cn-south"]
    write(c, grown)
    await hup_and_wait_for(c, "reload refused, nothing changed")
    assert "a region or a service added or removed" in c.log_of(agent_id)
    assert c.agents[agent_id].alive
