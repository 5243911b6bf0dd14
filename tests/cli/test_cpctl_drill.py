"""`cpctl drill` against a real 3-agent cluster, run as a subprocess as an operator runs it.

The load-balancer side (real HAProxy and nginx adapters reporting) is in
tests/acceptance/test_drill_lb.py; here no load balancer reports, so the RTO is measured
to the agents, and the refusals, the report, the expiry and Prometheus being away are
checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.cli.conftest import CPCTL, Decision, Live

DRILL_STAGES = ("committed", "served_all")
BACK_STAGES = ("back_committed", "back_weight_all", "back_full_all")


def east_down(d: Decision) -> bool:
    return all(p["cn-east"]["state"] == "down" for p in d["services"].values())


def test_a_drill_measures_every_stage_in_order_and_writes_its_report(restored: Live, tmp_path: Path) -> None:
    report = tmp_path / "east.md"
    done = restored.cpctl(
        "drill", "cn-east", "--duration", "4s", "--objective", "60s", "--reason", "game day",
        "--report", str(report), "--prometheus", "http://127.0.0.1:9", "--traffic-query", "up",
        "-y", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    stages = result["stages"]
    assert all(stages[k] is not None for k in DRILL_STAGES + BACK_STAGES), stages
    assert 0 < stages["committed"] <= stages["served_all"], stages
    assert stages["back_committed"] <= stages["back_weight_all"] <= stages["back_full_all"], stages
    assert result["rto_s"] == stages["served_all"] and result["passed"] is True
    assert "no LB reports" in result["rto_measured_to"]
    assert result["ended_by"] == "expiry" and 3.5 <= result["ended_after_s"] <= 20, result
    assert stages["revisions"]["out"] < stages["revisions"]["full_back"]
    # The timeline has the region at 0 and back at its base weight.
    order = [p["weights"]["order"]["cn-east"] for p in result["timeline"]]
    assert 0 in order and order[-1] == restored.baseline["services"]["order"]["cn-east"][0], order
    # Prometheus was away: the control-plane stages are all there, the traffic part says why not.
    assert "could not be read" in result["traffic"]["missing"]
    text = report.read_text()
    assert "PASSED" in text and "decision committed" in text and "Traffic was not measured" in text
    chart = report.with_suffix(".svg").read_text()
    assert chart.startswith("<svg") and "cn-east" in chart and "drill start" in chart
    # Live progress went to stderr, stage by stage.
    assert "served by every agent" in done.stderr and "way back" in done.stderr


def test_a_drill_ends_at_its_expiry_even_when_cpctl_is_killed(restored: Live) -> None:
    proc = subprocess.Popen(
        [CPCTL, "drill", "cn-east", "--duration", "5s", "--reason", "killed", "-y"],
        env=restored.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        restored.wait_all(east_down, "cn-east down for the drill")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        restored.wait_all(lambda d: not east_down(d), "cn-east back after the drill expired", timeout_s=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    entries = restored.get(restored.ids[1], "/v1/history?limit=50")["entries"]
    assert any(e["kind"] == "intent-removed" and e["who"] == "expiry" for e in entries)


def test_a_drill_is_refused_in_one_line_while_a_region_is_drained(restored: Live) -> None:
    drained = restored.cpctl("drain", "cn-south", "--service", "order", "--reason", "maintenance", "-y")
    assert drained.returncode == 0, drained.stderr
    before = restored.decision(restored.ids[0])["revision"]
    done = restored.cpctl("drill", "cn-east", "--duration", "1m", "--reason", "r", "-y")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cpctl: refused:") and "cn-south/order is drained" in last, done.stderr
    assert restored.decision(restored.ids[0])["revision"] == before
    assert not [i for i in restored.get(restored.ids[0], "/v1/intents")["intents"] if i["kind"] == "drill"]


def test_drill_stop_ends_a_running_drill_early(restored: Live) -> None:
    proc = subprocess.Popen(
        [CPCTL, "drill", "cn-east", "--duration", "10m", "--reason", "stopped", "-y", "-o", "json"],
        env=restored.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        restored.wait_all(east_down, "cn-east down for the drill")
        stopped = restored.cpctl("drill", "stop", "--reason", "seen enough")
        assert stopped.returncode == 0, stopped.stderr
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["ended_by"].startswith("stopped by") and result["ended_after_s"] < 120
    assert result["stages"]["back_full_all"] is not None
    time.sleep(0)  # the fixture restores the baseline
