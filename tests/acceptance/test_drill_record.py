"""A drill's result is recorded in the cluster: by the real `cpctl drill`, on real agents.

A real 3-agent cluster (the Raft backend, agent processes); `cpctl drill cn-east` run as
an operator runs it. Checked: cpctl says the result was recorded; every agent lists it
(`GET /v1/drills`) as cpctl measured it, recorded as the token's name; `cpctl drill
history` shows it; every agent's /metrics has the last drill's RTO and time; and an
agent restarted afterwards still lists it (replayed from its journal).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cli.conftest import Live, cli_config

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(300)]

WAIT_S = 60.0


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    cluster = Live(cli_config())
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            print(cluster.logs())
        cluster.stop()


def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {WAIT_S:g} s waiting for {what}")


def metrics(live: Live, agent_id: str) -> dict[str, float]:
    with urllib.request.urlopen(live.url(agent_id) + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        name: float(value)
        for name, value in (line.split(" ", 1) for line in text.splitlines())
        if name.startswith("controlplane_drill_")
    }


def test_cpctl_drill_records_its_result_on_every_agent_and_it_survives_a_restart(live: Live) -> None:
    done = live.cpctl(
        "drill", "cn-east", "--duration", "3s", "--objective", "60s", "--reason", "record test", "-y",
        "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["recorded"] is True, done.stderr

    def recorded_everywhere() -> dict[str, dict[str, Any]] | None:
        found = {a: live.get(a, "/v1/drills")["drills"] for a in live.ids}
        if all(d and d[0]["id"] == result["intent_id"] for d in found.values()):
            return {a: d[0] for a, d in found.items()}
        return None

    records = until(recorded_everywhere, "the drill on every agent")
    first = records[live.ids[0]]
    assert all(r == first for r in records.values())
    assert (first["region"], first["service"], first["who"]) == ("cn-east", None, "admin")
    assert (first["rto_s"], first["passed"], first["objective_s"]) == (
        result["rto_s"],
        result["passed"],
        60.0,
    )
    assert first["stages"]["served_all"] == result["stages"]["served_all"]

    history = live.cpctl_json("drill", "history")
    assert history["drills"][0]["id"] == result["intent_id"]
    table = live.cpctl("drill", "history")
    assert table.returncode == 0, table.stderr
    assert "cn-east" in table.stdout and ("passed" in table.stdout or "FAILED" in table.stdout)

    for agent in live.ids:
        seen = metrics(live, agent)
        assert seen["controlplane_drill_last_timestamp_seconds"] == first["ended_at"], (agent, seen)
        if first["passed"]:
            assert seen["controlplane_drill_last_passed_timestamp_seconds"] == first["ended_at"]
            assert seen["controlplane_drill_last_rto_seconds"] == first["rto_s"]

    # An agent restarted afterwards lists it again: it is in the replicated state.
    restarted = live.ids[-1]
    live.call(live.cluster.stop_agent(restarted))
    live.cluster.start_agent(restarted)
    live.call(live.cluster.wait_ready(WAIT_S))

    def listed_after_restart() -> bool:
        status, body = live.api(restarted, "/v1/drills")
        return status == 200 and bool(body["drills"]) and body["drills"][0] == first

    until(listed_after_restart, f"the drill on {restarted} after its restart")
