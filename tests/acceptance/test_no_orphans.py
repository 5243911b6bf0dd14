"""Given `controlplane demo --serve`, when it is killed with SIGKILL, then its agents stop too.

They used to keep running and holding the demo's ports, so the next `make demo` failed.
Each agent the harness starts watches its parent (`agent --exit-with-parent`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.testing.processes import children_of

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_agents_exit_when_the_demo_that_started_them_is_killed(tmp_path: Path) -> None:
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "demo",
            "--serve",
            "--random-ports",
            "--log-dir",
            str(tmp_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CONTROLPLANE_ADMIN_TOKEN": "demo-admin-token-0123456789"},
    )
    agents: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and "the deployment keeps running" not in (tmp_path / "demo.log").read_text()
        ):
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()
            time.sleep(0.5)
        agents = [
            pid
            for pid in children_of(demo.pid)
            if b"agent" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
        assert len(agents) == 3, (agents, (tmp_path / "demo.log").read_text()[-2000:])
        # The first hour: what it prints can be pasted as is (every agent, where cpctl is).
        printed = (tmp_path / "demo.log").read_text()
        endpoints = re.search(r"export CPCTL_ENDPOINT=(\S+)", printed)
        assert endpoints is not None and len(endpoints.group(1).split(",")) == 3, printed
        cpctl = re.search(r"export PATH=(\S+):\$PATH", printed)
        assert cpctl is not None and (Path(cpctl.group(1)) / "cpctl").exists(), printed
        demo.send_signal(signal.SIGKILL)
        demo.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in agents):
            time.sleep(0.2)
        assert not [p for p in agents if alive(p)], "agents still running after their demo was killed"
    finally:
        log.close()
        for pid in [demo.pid, *agents]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
