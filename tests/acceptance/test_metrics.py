"""A real agent's /metrics, probes included, is valid Prometheus exposition (promtool).

The agent runs with `CONTROLPLANE_TRACEMALLOC` set, so the diagnosis hooks of issue 15
are checked on a real process too: the process, build and task series, and SIGUSR2.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from controlplane.testing.localcluster import LocalCluster, remap_ports
from tests.acceptance.lb_fixtures import eventually
from tests.api.conftest import api_config

pytestmark = [pytest.mark.acceptance, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[LocalCluster]:
    config = remap_ports(api_config())
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    async with LocalCluster(config, extra_env={"CONTROLPLANE_TRACEMALLOC": "5"}) as c:
        await c.wait_ready(60)
        yield c


def url(c: LocalCluster, path: str) -> str:
    return next(iter(c.agents.values())).url + path


async def test_metrics_pass_promtool(solo: LocalCluster) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install the Debian package prometheus"
    async with aiohttp.ClientSession() as s, s.get(url(solo, "/metrics")) as r:
        text = await r.text()
    for name in (
        "controlplane_probe_duration_seconds_bucket",
        "controlplane_weight{",
        "controlplane_consensus_term",
        "controlplane_decision_revision",
        "controlplane_api_requests_total{",
        "controlplane_feature_enabled{",
        # Described even before any drill (then without a sample, which promtool accepts).
        "# TYPE controlplane_drill_last_rto_seconds gauge",
        "# TYPE controlplane_drill_last_timestamp_seconds gauge",
        "# TYPE controlplane_drill_last_passed_timestamp_seconds gauge",
    ):
        assert name in text, name
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_diagnosis_series_and_a_tracemalloc_dump_on_sigusr2(solo: LocalCluster) -> None:
    async with aiohttp.ClientSession() as s, s.get(url(solo, "/metrics")) as r:
        text = await r.text()
    for name in (
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "controlplane_build_info{",
        'controlplane_asyncio_tasks{loop="main"}',
        'controlplane_asyncio_tasks{loop="prober"}',
    ):
        assert name in text, name
    (agent,) = solo.agents.values()
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGUSR2)

    async def dumped() -> bool:
        log = solo.log_of(agent.id)
        return "tracemalloc: " in log and "top 25 allocation differences" in log

    await eventually(dumped, "the tracemalloc dump in the agent's log", timeout_s=30)
    # Still serving afterwards.
    async with aiohttp.ClientSession() as s, s.get(url(solo, "/healthz")) as r:
        assert r.status == 200
