"""Acceptance tests: real agent processes on loopback, real faults, real answers.

Every test starts a `LocalCluster` through the `cluster` fixture: three real agent
processes (the demo's three regions on random free ports, data dirs under the test's
tmp dir) and simulated backends in this process. The fixture always stops what it
started, pass or fail; when the test failed it prints the tail of every agent's log,
which pytest shows under the failure.

Waits are generous (the machine is shared and slow at times) and nothing asserts on
how long something took: durations worth knowing are recorded with `measure` and
printed in a summary at the end of the run.

`Recorder` samples what every agent serves while a fault plays out, so a test can
assert on every moment of an episode, not only on where it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports

READY_TIMEOUT_S = 90.0
FAULT_TIMEOUT_S = 45.0
LOG_TAIL_CHARS = 6000

# The demo's regions, services and base weights (capacity 6000/5000/4000 rps).
REGIONS = ("cn-east", "cn-south", "cn-north")
SERVICES = ("order", "inventory", "gateway")
BASE_WEIGHTS = {"cn-east": 40, "cn-south": 33, "cn-north": 27}

Decision = dict[str, Any]
StartCluster = Callable[..., Awaitable[LocalCluster]]


def fast_config(**policy: Any) -> dict[str, Any]:
    """The demo config (probes every 0.5 s, fall 2, rise 2) on free ports, shorter holds."""
    config = remap_ports(load_demo_config())
    config["policy"].update({"recovery_hold_s": 2.0, "ramp_step_s": 1.5, **policy})
    return config


# -- reading decisions ------------------------------------------------------------------


def weights(decision: Decision, service: str) -> dict[str, int]:
    return {region: p["weight"] for region, p in decision["services"][service].items()}


def all_weights(decision: Decision) -> dict[str, dict[str, int]]:
    return {service: weights(decision, service) for service in decision["services"]}


def outcome(decision: Decision) -> str:
    """What a reader acts on, as one comparable string."""
    keys = ("services", "features", "panic", "shed_fraction", "frozen")
    return json.dumps({k: decision.get(k) for k in keys}, sort_keys=True)


def region_out(decision: Decision, region: str) -> bool:
    return all(decision["services"][s][region]["weight"] == 0 for s in decision["services"])


async def wait_all(
    cluster: LocalCluster,
    check: Callable[[Decision], bool],
    what: str,
    agent_ids: Iterable[str] | None = None,
    timeout_s: float = FAULT_TIMEOUT_S,
) -> dict[str, Decision]:
    """Until every given agent (default: every live one) serves a decision passing `check`."""
    ids = list(agent_ids) if agent_ids is not None else None

    async def every_agent() -> dict[str, Decision] | None:
        ds = await cluster.decisions(ids)
        if ds and all(d is not None and check(d) for d in ds.values()):
            return {k: v for k, v in ds.items() if v is not None}
        return None

    try:
        found: dict[str, Decision] = await cluster.wait_for(every_agent, timeout_s, what, interval_s=0.05)
    except TimeoutError:
        seen = await cluster.decisions(ids)
        summary = {
            a: None if d is None else {"revision": d["revision"], "reasons": d["reasons"]}
            for a, d in seen.items()
        }
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; agents serve {summary}")
    return found


async def same_revision(cluster: LocalCluster, agent_ids: Iterable[str]) -> dict[str, Decision]:
    """Until the given agents serve the same revision; their decisions."""
    ids = list(agent_ids)

    async def agreed() -> dict[str, Decision] | None:
        ds = await cluster.decisions(ids)
        found = {k: v for k, v in ds.items() if v is not None}
        if len(found) == len(ids) and len({d["revision"] for d in found.values()}) == 1:
            return found
        return None

    result: dict[str, Decision] = await cluster.wait_for(
        agreed, READY_TIMEOUT_S, f"{ids} to serve the same revision"
    )
    return result


async def leader_of(cluster: LocalCluster) -> str:
    return await cluster.wait_leader(READY_TIMEOUT_S)


async def cluster_view(cluster: LocalCluster, agent_id: str) -> dict[str, Any]:
    status, _, body = await cluster.get(agent_id, "/v1/cluster")
    assert status == 200, f"GET /v1/cluster on {agent_id} answered {status}"
    assert isinstance(body, dict)
    return body


# -- sampling an episode ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    agent: str
    at: float  # time.monotonic() when the answer came
    status: int  # 0 when the agent did not answer
    stale: bool  # the X-Controlplane-Stale header was present
    decision: Decision | None

    @property
    def revision(self) -> int | None:
        return None if self.decision is None else int(self.decision["revision"])


@dataclass
class Recorder:
    """Samples `GET /v1/decision` on agents until the `async with` block ends.

    `mode="poll"` asks every `interval_s` (every moment, including a paused or cut-off
    agent's, with a short timeout); `mode="watch"` long-polls with `?index=`, so every
    new revision is seen within a round trip of being applied.
    """

    cluster: LocalCluster
    agent_ids: Iterable[str] | None = None
    mode: Literal["poll", "watch"] = "poll"
    interval_s: float = 0.05
    timeout_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Recorder:
        ids = list(self.agent_ids) if self.agent_ids is not None else list(self.cluster.agents)
        self._tasks = [asyncio.create_task(self._sample(a)) for a in ids]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def of(self, agent_id: str) -> list[Sample]:
        return [s for s in self.samples if s.agent == agent_id]

    def decisions(self, since: float = 0.0) -> list[Decision]:
        """Every decision seen (by any agent) at or after `since`, in revision order."""
        seen = [s for s in self.samples if s.decision is not None and s.at >= since]
        return [s.decision for s in sorted(seen, key=lambda s: (s.revision, s.at)) if s.decision]

    async def _sample(self, agent_id: str) -> None:
        index = 0
        while True:
            if self.mode == "watch":
                path, timeout_s = f"/v1/decision?index={index}&wait=5s", 10.0
            else:
                path, timeout_s = "/v1/decision", self.timeout_s
            sample = await self._get(agent_id, path, timeout_s)
            self.samples.append(sample)
            if sample.revision is not None:
                index = max(index, sample.revision)
            if self.mode == "poll" or sample.status != 200:
                await asyncio.sleep(self.interval_s)

    async def _get(self, agent_id: str, path: str, timeout_s: float) -> Sample:
        url = self.cluster.agents[agent_id].url + path
        try:
            async with self.cluster.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await r.json(content_type=None)
                stale = "X-Controlplane-Stale" in r.headers
                decision = body if r.status == 200 and isinstance(body, dict) else None
                return Sample(agent_id, time.monotonic(), r.status, stale, decision)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return Sample(agent_id, time.monotonic(), 0, False, None)


# -- fixtures ---------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(node: pytest.Item) -> bool:
    for when in ("setup", "call"):
        report = getattr(node, f"rep_{when}", None)
        if report is not None and report.failed:
            return True
    return getattr(node, "rep_call", None) is None


def agent_logs(cluster: LocalCluster, chars: int = LOG_TAIL_CHARS) -> str:
    parts = []
    for agent_id, agent in cluster.agents.items():
        code = None if agent.proc is None else agent.proc.poll()
        parts.append(f"===== {agent_id} (exit code {code}) log tail: {agent.log_path} =====")
        parts.append(cluster.log_of(agent_id)[-chars:])
    return "\n".join(parts)


@pytest.fixture
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StartCluster]:
    """`await cluster(config=None, ready=True, before_agents=None, **LocalCluster options)`.

    Starts the backends, awaits `before_agents(cluster)` if given (to set backends up
    before any agent probes them), starts the agents, and waits until every agent is
    ready and serves the same revision (unless `ready=False`). Every cluster is stopped
    at the end of the test, whatever happened.
    """
    started: list[LocalCluster] = []

    async def start(
        config: dict[str, Any] | None = None,
        *,
        ready: bool = True,
        before_agents: Callable[[LocalCluster], Awaitable[None]] | None = None,
        **options: Any,
    ) -> LocalCluster:
        c = LocalCluster(
            config if config is not None else fast_config(),
            workdir=tmp_path / f"cluster-{len(started)}",
            **options,
        )
        started.append(c)
        await c.start(agents=False)
        if before_agents is not None:
            await before_agents(c)
        for agent_id in c.agents:
            c.start_agent(agent_id)
        if ready:
            await c.wait_ready(READY_TIMEOUT_S)
        return c

    try:
        yield start
    finally:
        for c in started:
            with contextlib.suppress(Exception):
                await c.stop()
            if _failed(request.node):
                print(f"\nagent logs of {c.workdir}:\n{agent_logs(c)}")
        # A CRITICAL line in an agent's log is a bug report (a dead task, a consensus safety
        # check): no test may pass with one, unless it provokes it on purpose.
        if not _failed(request.node) and request.node.get_closest_marker("critical_expected") is None:
            critical = [
                f"{agent_id}: {line}"
                for c in started
                for agent_id in c.agents
                for line in c.log_of(agent_id).splitlines()
                if " CRITICAL " in line
            ]
            assert not critical, "CRITICAL in agent logs:\n" + "\n".join(critical[:20])


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a line (a duration worth knowing) for the summary at the end of the run.

    Kept in the test's report (`user_properties`), so the lines reach the summary from
    pytest-xdist's worker processes too.
    """

    def record(text: str) -> None:
        request.node.user_properties.append(("measurement", f"{request.node.name}: {text}"))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "teardown"
        for key, value in getattr(report, "user_properties", ())
        if key == "measurement"
    ]
    if lines:
        terminalreporter.section("acceptance measurements")
        for line in lines:
            terminalreporter.write_line(line)
