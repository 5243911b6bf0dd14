"""Given real HAProxy and nginx adapters, every agent knows what each load balancer applied.

Both adapters run as processes (the real CLI) with a token of scope `lb`, reporting
every 0.5 s (`--report-s 0.5`). After a decision change, `GET /v1/lbs` on every agent
shows each of them with the new revision applied and when. An adapter killed with
SIGKILL says nothing more: every agent shows it `silent` after 3 heartbeats, then
forgets it at its expiry (here 10 heartbeats, 5 s: the agents' floor is lowered to 3 s
by `api.lb_report_min_expiry_s`), while the other one stays in sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.testing.localcluster import LocalCluster
from tests.acceptance.lb_fixtures import (
    FAILED,
    SERVICE,
    Adapter,
    HAProxy,
    Nginx,
    StartCluster,
    agent_args,
    backend_addresses,
    eventually,
    every_agent,
    lb_config,
)
from tests.acceptance.test_lb_cpctl import CPCTL
from tests.acceptance.test_lb_haproxy import haproxy_adapter
from tests.acceptance.test_lb_nginx import nginx_adapter

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

REPORT_S = 0.5
MIN_EXPIRY_S = 3.0
HAPROXY_NAME = "haproxy@reports-test"
NGINX_NAME = "nginx@reports-test"


def reports_config() -> dict[str, Any]:
    """The LB config, with an admin token and a token of scope lb for the adapters."""
    config = lb_config()
    config["auth"] = {
        "tokens": [
            {"name": "admin", "scope": "admin", "secret": {"env": "CONTROLPLANE_ADMIN_TOKEN"}},
            {"name": "lb-adapters", "scope": "lb", "secret": {"env": "CONTROLPLANE_LB_TOKEN"}},
        ]
    }
    config["api"] = {**config.get("api", {}), "lb_report_min_expiry_s": MIN_EXPIRY_S}
    return config


LB_TOKEN = secrets.token_hex(16)


async def reporting_lbs(
    c: LocalCluster, tmp_path: Path, cleanup: contextlib.AsyncExitStack
) -> tuple[HAProxy, Nginx, list[Adapter]]:
    """A real HAProxy and a real nginx in front of `order`, each with its adapter reporting
    every REPORT_S with the `lb` token as HAPROXY_NAME / NGINX_NAME; all started, and all
    stopped by `cleanup` in reverse order whatever fails (a stop included)."""
    (tmp_path / "haproxy").mkdir()
    (tmp_path / "nginx").mkdir()
    hap = HAProxy(tmp_path / "haproxy", backend_addresses(c))
    ngx = Nginx(tmp_path / "nginx", backend_addresses(c))
    report = ("--token", LB_TOKEN, "--report-s", str(REPORT_S))
    agents = agent_args(c)
    adapters = [
        haproxy_adapter(tmp_path / "haproxy", agents, hap, *report, "--name", HAPROXY_NAME),
        nginx_adapter(tmp_path / "nginx", agents, ngx, *report, "--name", NGINX_NAME),
    ]
    cleanup.push_async_callback(ngx.stop)
    cleanup.push_async_callback(hap.stop)
    for adapter in adapters:
        cleanup.push_async_callback(adapter.stop)
    await hap.start()
    await ngx.start()
    for adapter in adapters:
        adapter.start()
    return hap, ngx, adapters


async def lbs_everywhere(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """Each live agent's `GET /v1/lbs`, by agent id (an agent that did not answer is left out)."""
    answers = await asyncio.gather(*(cluster.get(a, "/v1/lbs") for a in cluster.agents))
    return {a: body for a, (status, _, body) in zip(cluster.agents, answers, strict=True) if status == 200}


async def until_every_agent(
    cluster: LocalCluster, check: Callable[[dict[str, dict[str, Any]]], bool], what: str
) -> dict[str, dict[str, Any]]:
    """Until every agent's view (LB name -> entry) passes `check`; the views by agent."""

    async def probe() -> dict[str, dict[str, Any]] | None:
        seen = await lbs_everywhere(cluster)
        if len(seen) < len(cluster.agents):
            return None
        views = {a: {lb["name"]: lb for lb in body["lbs"]} for a, body in seen.items()}
        return views if all(check(v) for v in views.values()) else None

    result: dict[str, dict[str, Any]] = await eventually(probe, what)
    return result


def lb_series(text: str, lb: str) -> list[str]:
    return [
        line for line in text.splitlines() if line.startswith("controlplane_lb_") and f'lb="{lb}"' in line
    ]


async def scrape(cluster: LocalCluster, agent_id: str) -> str:
    async with cluster.session.get(cluster.agents[agent_id].url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def cpctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(a.url for a in cluster.agents.values())
    env = {"CPCTL_ENDPOINT": endpoints, "PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1"}
    return await asyncio.to_thread(
        subprocess.run, [str(CPCTL), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


async def test_every_agent_sees_what_each_lb_applied_and_forgets_a_dead_one(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(reports_config(), extra_env={"CONTROLPLANE_LB_TOKEN": LB_TOKEN})
    async with contextlib.AsyncExitStack() as cleanup:
        _, _, adapters = await reporting_lbs(c, tmp_path, cleanup)
        healthy = await every_agent(c, lambda d: True, "a decision on every agent")

        def both_applied(revision: int) -> Callable[[dict[str, dict[str, Any]]], bool]:
            def check(view: dict[str, dict[str, Any]]) -> bool:
                return all(
                    name in view
                    and (view[name]["applied_revision"] or 0) >= revision
                    and view[name]["state"] == "in-sync"
                    for name in (HAPROXY_NAME, NGINX_NAME)
                )

            return check

        await until_every_agent(c, both_applied(healthy), "both LBs in sync on every agent")

        # A decision change: cn-east/order goes down.
        fault_at = time.monotonic()
        fault_wall = time.time()
        await c.fail_region(FAILED)
        revision = await every_agent(
            c, lambda d: d["services"][SERVICE][FAILED]["state"] == "down", "cn-east/order down"
        )
        views = await until_every_agent(c, both_applied(revision), f"both LBs at revision {revision}")
        reported_s = time.monotonic() - fault_at
        measure(f"fault -> both LBs reported revision {revision} on every agent {reported_s:.2f} s")
        for agent_id, view in views.items():
            for name, adapter in ((HAPROXY_NAME, "haproxy"), (NGINX_NAME, "nginx")):
                entry = view[name]
                assert entry["adapter"] == adapter, (agent_id, entry)
                assert entry["ok"] is True and entry["error"] is None, (agent_id, entry)
                assert entry["heartbeat_s"] == REPORT_S, (agent_id, entry)
                assert entry["lag_revisions"] == 0, (agent_id, entry)
                assert entry["desired_revision"] >= revision, (agent_id, entry)
                # Applied after the fault (the adapters' clocks are this machine's).
                assert fault_wall <= entry["applied_at"] <= time.time(), (agent_id, entry)
                assert entry["applied_epoch"], (agent_id, entry)
        for adapter in adapters:
            status = adapter.status()
            assert status["applied_revision"] >= revision, status
            assert status["applied_at"] >= fault_wall, status
        shown = await cpctl(c, "status")
        assert shown.returncode == 0, shown.stderr
        assert "load balancers (2)" in shown.stdout, shown.stdout
        for name in (HAPROXY_NAME, NGINX_NAME):
            (row,) = [line for line in shown.stdout.splitlines() if name in line]
            assert "in-sync" in row, row
        shown = await cpctl(c, "status", "-o", "json")
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)["lbs"]
        assert [lb["name"] for lb in listed["lbs"]] == [HAPROXY_NAME, NGINX_NAME], listed
        assert listed["limit"] == 1024
        first = next(iter(c.agents))
        metrics = await scrape(c, first)
        assert f'controlplane_lb_ok{{lb="{NGINX_NAME}"}} 1.0' in metrics, lb_series(metrics, NGINX_NAME)
        assert f'controlplane_lb_applied_revision_lag{{lb="{HAPROXY_NAME}"}} 0.0' in metrics

        # The nginx adapter dies without a word: silent after 3 heartbeats, then forgotten.
        nginx_adapter_proc = adapters[1].proc
        assert nginx_adapter_proc is not None
        nginx_adapter_proc.kill()
        await asyncio.to_thread(nginx_adapter_proc.wait, 10)
        killed_at = time.monotonic()
        await until_every_agent(
            c,
            lambda v: (
                v.get(NGINX_NAME, {}).get("state") == "silent"
                and v.get(HAPROXY_NAME, {}).get("state") == "in-sync"
            ),
            "the killed nginx adapter silent on every agent, HAProxy's still in sync",
        )
        measure(f"adapter killed -> silent on every agent {time.monotonic() - killed_at:.2f} s")
        await until_every_agent(
            c,
            lambda v: NGINX_NAME not in v and v.get(HAPROXY_NAME, {}).get("state") == "in-sync",
            "the killed nginx adapter gone from every agent",
        )
        gone_s = time.monotonic() - killed_at
        measure(f"adapter killed -> forgotten on every agent {gone_s:.2f} s (expiry 5 s)")
        assert gone_s >= 10 * REPORT_S - 1.0, "forgotten before its expiry"
        metrics = await scrape(c, first)
        assert lb_series(metrics, NGINX_NAME) == []
        assert lb_series(metrics, HAPROXY_NAME), "the live adapter's series are still there"
