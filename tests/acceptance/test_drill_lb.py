"""A drill through real HAProxy and nginx: traffic moves, and the RTO is what the LBs applied.

A real cluster; real HAProxy and nginx in front of the simulated cn-east/cn-south/cn-north
backends of `order`, each steered by its adapter (the real CLI, reporting to every agent
with a token of scope `lb`); `cpctl drill cn-east --service order` run as a process with
the admin token, while requests flow through both load balancers. Checked: the report's
stages are in order, its RTO is the moment the last load balancer applied the drill's
revision, no request reached cn-east through either load balancer after that moment (plus
the in-flight slack) until the drill ended, traffic came back to cn-east after it, and the
Markdown report names both load balancers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.lb_fixtures import (
    FAILED,
    StartCluster,
    Traffic,
    every_agent,
)
from tests.acceptance.test_lb_cpctl import CPCTL
from tests.acceptance.test_lb_reports import (
    HAPROXY_NAME,
    LB_TOKEN,
    NGINX_NAME,
    reporting_lbs,
    reports_config,
    until_every_agent,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(300)]

DURATION_S = 8.0
# A request sent just before the load balancer changed its weights may still reach cn-east.
IN_FLIGHT_SLACK_S = 0.5


async def test_a_drill_moves_real_traffic_and_its_rto_is_when_the_lbs_applied_it(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(reports_config(), extra_env={"CONTROLPLANE_LB_TOKEN": LB_TOKEN})
    report = tmp_path / "drill.md"
    async with contextlib.AsyncExitStack() as cleanup:
        hap, ngx, _ = await reporting_lbs(c, tmp_path, cleanup)
        healthy = await every_agent(c, lambda d: True, "a decision on every agent")

        def in_sync(view: dict[str, dict[str, Any]]) -> bool:
            return all(
                (view.get(n, {}).get("applied_revision") or 0) >= healthy and view[n]["state"] == "in-sync"
                for n in (HAPROXY_NAME, NGINX_NAME)
            )

        await until_every_agent(c, in_sync, "both LBs in sync on every agent")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")},
            "CPCTL_ENDPOINT": ",".join(a.url for a in c.agents.values()),
            "CPCTL_TOKEN": c.admin_token,
            "NO_COLOR": "1",
        }
        argv = [
            str(CPCTL), "drill", FAILED, "--service", "order", "--duration", f"{DURATION_S:g}s",
            "--objective", "30s", "--reason", "acceptance drill", "--report", str(report), "-y", "-o", "json",
        ]  # fmt: skip
        async with Traffic(hap.url) as via_haproxy, Traffic(ngx.url) as via_nginx:
            await asyncio.sleep(1.0)
            mono_minus_wall = time.monotonic() - time.time()
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 180)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await asyncio.sleep(1.0)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    stages = result["stages"]
    assert result["rto_measured_to"] == "every reporting load balancer", result
    assert {lb["name"] for lb in result["lbs"]} == {HAPROXY_NAME, NGINX_NAME}
    assert 0 < stages["committed"] <= stages["served_all"], stages
    assert stages["committed"] <= stages["applied_all"] == result["rto_s"], stages
    assert stages["late_lbs"] == [] and result["passed"] is True, stages
    assert stages["back_committed"] <= stages["back_weight_all"] <= stages["back_full_all"], stages
    assert stages["back_applied_all"] is not None and stages["back_late_lbs"] == [], stages
    measure(
        f"drill through HAProxy and nginx: committed {stages['committed']:.2f} s, every agent "
        f"{stages['served_all']:.2f} s, every LB applied (RTO) {result['rto_s']:.2f} s; back: weight "
        f"{stages['back_weight_all']:.2f} s, LBs {stages['back_applied_all']:.2f} s, "
        f"full {stages['back_full_all']:.2f} s"
    )

    # What the load balancers did with real requests, on the same clock as cpctl's stages.
    started = result["started_at"] + mono_minus_wall
    moved = started + result["rto_s"] + IN_FLIGHT_SLACK_S
    ended = result["ended_at"] + mono_minus_wall
    for name, traffic in (("haproxy", via_haproxy), ("nginx", via_nginx)):
        before = traffic.since(started - 1.0, started)
        assert before[FAILED] > 0, (name, before)  # cn-east had traffic before the drill
        during = traffic.since(moved, ended)
        assert during[FAILED] == 0 and sum(during.values()) > 50, (name, during)
        assert not [r for r in during if r.startswith("error")], (name, during)
        back = traffic.since(ended)
        assert back[FAILED] > 0, (name, back)  # and again after it
    text = report.read_text()
    assert "PASSED" in text and HAPROXY_NAME in text and NGINX_NAME in text
    assert report.with_suffix(".svg").read_text().startswith("<svg")
