"""cpctl against a real 3-agent cluster, driven as an operator drives it: as a subprocess.

The simulated region backends live in this process, so the cluster runs on an event
loop of its own in a background thread: a test can block on `subprocess.run(cpctl ...)`
while the backends keep answering the agents' probes. One cluster serves a whole
module (starting one costs seconds); `Live.restore` puts it back where it started
(no standing intents, every weight at its base, every feature on) after a test that
changed it. When a test failed, the teardown prints the tail of every agent's log.

Nothing asserts on durations; every wait is generous, because the machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from controlplane.testing.faultproxy import ProxyMesh
from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports

CPCTL = str(Path(sys.executable).with_name("cpctl"))
READY_TIMEOUT_S = 90.0
CHANGE_TIMEOUT_S = 60.0
CPCTL_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 4000

Decision = dict[str, Any]


def cli_config() -> dict[str, Any]:
    """The demo config on free ports, with short recovery holds so undrains finish quickly."""
    config = remap_ports(load_demo_config())
    config["policy"] = {**config["policy"], "recovery_hold_s": 1, "ramp_step_s": 1}
    return config


def outcome(decision: Decision) -> dict[str, Any]:
    """What traffic sees: weights and states, features, shedding, freeze and panic."""
    return {
        "services": {
            s: {r: (p["weight"], p["state"]) for r, p in placements.items()}
            for s, placements in decision["services"].items()
        },
        "features": decision["features"],
        "shed_fraction": decision["shed_fraction"],
        "frozen": decision["frozen"],
        "panic": decision["panic"],
    }


def weights(decision: Decision, service: str) -> dict[str, int]:
    return {r: p["weight"] for r, p in decision["services"][service].items()}


class Live:
    """The cluster, its own loop, and helpers to run cpctl and read the API directly."""

    def __init__(self, config: dict[str, Any]) -> None:
        # Raft traffic goes through fault proxies, so that a test can cut an agent off.
        self.cluster = LocalCluster(config, with_proxies=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cli-test-cluster", daemon=True)
        self.baseline: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def call(self, coro: Any, timeout_s: float = READY_TIMEOUT_S + 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    def start(self) -> None:
        self.thread.start()
        self.call(self.cluster.start())
        self.call(self.cluster.wait_ready(READY_TIMEOUT_S))
        self.settle()
        self.baseline = outcome(self.decision(self.ids[0]))

    def stop(self) -> None:
        try:
            if self.thread.is_alive():
                self.call(self.cluster.stop(), timeout_s=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()

    def settle(self, quiet_s: float = 2.0) -> int:
        """Until the revision has not moved for `quiet_s` (start-up observations settle)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            rev = self.decision(self.ids[0])["revision"]
            if rev != last:
                last, since = rev, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return int(rev)
            time.sleep(0.1)
        raise TimeoutError(f"the revision was still moving after {READY_TIMEOUT_S:g} s (at {last})")

    def isolate(self, agent_id: str) -> None:
        """Cut `agent_id` off from the other agents (it keeps serving its API, stale)."""
        self.call(self._in_loop(lambda: self._mesh().isolate(agent_id)))

    def heal(self) -> None:
        self.call(self._in_loop(lambda: self._mesh().heal_all()))
        self.call(self.cluster.wait_ready(READY_TIMEOUT_S))

    def _mesh(self) -> ProxyMesh:
        if self.cluster.mesh is None:
            raise RuntimeError("the cluster runs without fault proxies")
        return self.cluster.mesh

    @staticmethod
    async def _in_loop(f: Callable[[], None]) -> None:
        f()  # the proxies belong to the cluster's loop: change them from inside it

    def logs(self) -> str:
        return "\n".join(
            f"--- {a} log (tail) ---\n{self.cluster.log_of(a)[-LOG_TAIL_CHARS:]}" for a in self.cluster.agents
        )

    # -- addresses ---------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self.cluster.agents)

    def url(self, agent_id: str) -> str:
        return self.cluster.agents[agent_id].url

    @property
    def urls(self) -> list[str]:
        return [self.url(a) for a in self.ids]

    @property
    def token(self) -> str:
        return self.cluster.admin_token

    # -- running cpctl -----------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
        env.update(
            {
                "CPCTL_ENDPOINT": ",".join(self.urls),
                "CPCTL_TOKEN": self.token,
                "COLUMNS": "160",
                "NO_COLOR": "1",
            }
        )
        env.update(extra or {})
        return env

    def cpctl(
        self, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = CPCTL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """`cpctl ARGS` against this cluster (every agent as an endpoint, the admin token)."""
        return subprocess.run(
            [CPCTL, *args],
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def cpctl_json(self, *args: str, env: Mapping[str, str] | None = None) -> Any:
        done = self.cpctl(*args, "-o", "json", env=env)
        assert done.returncode == 0, f"cpctl {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return json.loads(done.stdout)

    # -- the API, directly -------------------------------------------------------------

    def api(self, agent_id: str, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(agent_id) + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, agent_id: str, path: str) -> Any:
        status, body = self.api(agent_id, path)
        assert status == 200, f"GET {path} on {agent_id} answered {status}: {body}"
        return body

    def decision(self, agent_id: str) -> Decision:
        body: Decision = self.get(agent_id, "/v1/decision")
        return body

    def wait_all(
        self, check: Callable[[Decision], bool], what: str, timeout_s: float = CHANGE_TIMEOUT_S
    ) -> None:
        """Until every agent serves a decision that passes `check`."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, Decision] = {}
        while time.monotonic() < deadline:
            seen = {a: self.decision(a) for a in self.ids}
            if all(check(d) for d in seen.values()):
                return
            time.sleep(0.1)
        summary = {a: {"revision": d["revision"], "outcome": outcome(d)} for a, d in seen.items()}
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; the agents serve {summary}")

    def restore(self) -> None:
        """Remove every standing intent and wait until traffic is back at the baseline."""
        for intent in self.get(self.ids[0], "/v1/intents")["intents"]:
            status, body = self.api(self.ids[0], f"/v1/intents/{intent['id']}?reason=test+cleanup", "DELETE")
            assert status in (200, 404), body
        self.wait_all(lambda d: outcome(d) == self.baseline, "the baseline (no intents, base weights)")


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    cluster = Live(cli_config())
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        if request.session.testsfailed > failed_before:
            print(cluster.logs())
        cluster.stop()


@pytest.fixture
def restored(live: Live) -> Iterator[Live]:
    """The cluster, put back at its baseline after the test (pass or fail)."""
    yield live
    live.restore()
