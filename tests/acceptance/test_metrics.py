"""A real agent's /metrics, probes included, is valid Prometheus exposition (promtool)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from controlplane.testing.localcluster import LocalCluster, remap_ports
from tests.api.conftest import api_config

pytestmark = [pytest.mark.acceptance, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[LocalCluster]:
    config = remap_ports(api_config())
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    async with LocalCluster(config) as c:
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
