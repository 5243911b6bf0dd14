"""Applications using the OpenFeature SDK see a feature go off when an operator runs cpctl.

Three real agent processes; two "applications" in this process, each an OpenFeature
client evaluating `comments` every 10 ms in its own thread, as request handlers would:

- one through OFREP with the generic `openfeature-provider-ofrep` from PyPI, pointed at
  one agent, knowing nothing of controlplane;
- one through the SDK's `ControlplaneProvider`, which follows the decision by long-poll.

`cpctl feature disable comments` runs as a real executable. How long each application
took to see the change is printed in the acceptance summary; the assertion allows a
wide margin, since the machine running the suite may be loaded (bench/ is for numbers).
Then every agent is killed: the SDK's provider keeps the last known good value (STALE),
while the generic provider, which asks an agent on every evaluation, falls back to the
code default.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from openfeature import api as openfeature
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from controlplane.client.openfeature_provider import ControlplaneProvider
from tests.acceptance.conftest import StartCluster

pytestmark = [pytest.mark.acceptance]

CPCTL = str(Path(sys.executable).with_name("cpctl"))
# "Within a second" is the goal (measured and printed); this is what a loaded machine may take.
MARGIN_S = 5.0


class Watcher(threading.Thread):
    """Evaluates a boolean flag every 10 ms until it reads False; notes when (monotonic)."""

    def __init__(self, client: OpenFeatureClient, flag: str, deadline_s: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.flag = flag
        self.deadline = time.monotonic() + deadline_s
        self.off_at: float | None = None
        self.evaluations = 0
        self.errors = 0

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            details = self.client.get_boolean_details(self.flag, True)
            self.evaluations += 1
            self.errors += details.error_code is not None
            if details.value is False and details.error_code is None:
                self.off_at = time.monotonic()
                return
            time.sleep(0.01)


def cpctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CPCTL, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


async def test_openfeature_applications_see_a_feature_go_off_after_cpctl_feature_disable(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    urls = [a.url for a in c.agents.values()]
    generic = OFREPProvider(urls[1], timeout=2.0)
    ours = ControlplaneProvider(urls, wait_s=10)
    try:
        openfeature.set_provider(generic, domain="generic-ofrep")
        await asyncio.to_thread(openfeature.set_provider_and_wait, ours, "controlplane-sdk")
        apps = {
            "generic OFREP provider": openfeature.get_client("generic-ofrep"),
            "controlplane provider": openfeature.get_client("controlplane-sdk"),
        }
        for name, client in apps.items():
            details = await asyncio.to_thread(client.get_boolean_details, "comments", False)
            assert (details.value, details.error_code) == (True, None), (name, details)
        watchers = {name: Watcher(client, "comments") for name, client in apps.items()}
        for w in watchers.values():
            w.start()

        env = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
        env.update({"CPCTL_ENDPOINT": urls[0], "CPCTL_TOKEN": c.admin_token})
        started = time.monotonic()
        done = await asyncio.to_thread(
            cpctl, env, "feature", "disable", "comments", "--reason", "openfeature test", "--yes"
        )
        returned = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        for w in watchers.values():
            await asyncio.to_thread(w.join, 60)
        for name, w in watchers.items():
            assert w.off_at is not None, f"{name} never saw comments off ({w.evaluations} evaluations)"
            measure(
                f"{name}: comments off {w.off_at - returned:+.3f} s after cpctl returned "
                f"({w.off_at - started:.3f} s after it started; cpctl took {returned - started:.2f} s; "
                f"{w.evaluations} evaluations, {w.errors} errors)"
            )
            assert w.off_at - returned < MARGIN_S, name
            assert w.errors == 0, name

        # Every agent gone: the follower keeps the last known good decision.
        for agent_id in c.agents:
            c.kill_agent(agent_id, signal.SIGKILL)
        sdk = apps["controlplane provider"]
        deadline = time.monotonic() + 30
        while (details := sdk.get_boolean_details("comments", True)).reason != Reason.STALE:
            assert time.monotonic() < deadline, f"the provider never noticed the agents are gone: {details}"
            await asyncio.sleep(0.1)
        assert (details.value, details.error_code) == (False, None), "last known good, not the default"
        fallback = await asyncio.to_thread(
            apps["generic OFREP provider"].get_boolean_details, "comments", True
        )
        assert (fallback.value, fallback.error_code) == (True, ErrorCode.GENERAL), "the code default"
    finally:
        await asyncio.to_thread(openfeature.clear_providers)
