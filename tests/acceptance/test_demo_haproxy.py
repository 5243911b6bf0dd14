"""`scripts/demo-haproxy.sh`: a real HAProxy on the demo's weights in one command, and nothing
left behind when it is stopped.

It uses the demo's fixed ports (config/demo.yaml: 87xx, 77xx, 9xxx), which no other test
uses (they take free ports between 20000 and 32000).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane.testing.ports import free_port
from controlplane.testing.processes import session_members
from tests.acceptance.lb_fixtures import require_binary

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo-haproxy.sh"


def test_the_demo_haproxy_script_puts_real_traffic_on_the_demos_weights(tmp_path: Path) -> None:
    require_binary("haproxy", "haproxy")
    port = free_port()
    out = (tmp_path / "out.txt").open("wb")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env={**os.environ, "HAPROXY_PORT": str(port), "VENV_BIN": str(Path(sys.executable).parent)},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        while "follows the demo's decision" not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()
            assert time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.5)
        printed = (tmp_path / "out.txt").read_text()
        work = re.search(r"logs in (\S+) ", printed)
        assert work is not None, printed

        def lbs() -> list[dict[str, object]]:
            with urllib.request.urlopen("http://127.0.0.1:8701/v1/lbs", timeout=5) as r:
                return list(json.loads(r.read())["lbs"])

        while not [lb for lb in lbs() if lb["name"] == "demo-haproxy" and lb["state"] == "in-sync"]:
            assert time.monotonic() < deadline, lbs()
            time.sleep(0.5)
        regions: collections.Counter[str] = collections.Counter()
        for _ in range(60):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                regions[r.headers.get("X-Region", "?")] += 1
        assert set(regions) == {"cn-east", "cn-south", "cn-north"}, regions  # every region has weight
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()
    # Its trap stopped the demo (and its agents), HAProxy and the adapter.
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_members(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running: {left}"
