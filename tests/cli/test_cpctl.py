"""cpctl, the real executable, against a real 3-agent cluster.

Read as scenarios: "given the cluster, when the operator drains cn-east, then its weight
is 0 on every agent"; "given the first endpoint is dead, cpctl uses the next". The help
tests need no cluster; every other test shares one (see conftest.py) and puts it back
the way it found it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from controlplane.testing.ports import free_port
from tests.cli.conftest import CPCTL, Live, outcome, weights

GLOBAL_OPTIONS = ("--endpoint", "--token-file", "--as", "--output", "--timeout", "--debug")
ACTION_OPTIONS = ("--reason", "--yes", "--dry-run")

# Every command DESIGN.md ("Operator CLI: cpctl") documents, and what its help must mention.
COMMANDS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("status",): (),
    ("regions",): (),
    ("weights",): ("SERVICE",),
    ("history",): ("--limit", "--before"),
    ("intents",): (),
    ("observations",): (),
    ("watch",): ("--count",),
    ("plan",): ("--fail",),
    ("drain",): ("REGION", "--service", *ACTION_OPTIONS, "--for"),
    ("undrain",): ("REGION", "--service", *ACTION_OPTIONS),
    ("failover",): ("--from", "--to", "--service", *ACTION_OPTIONS, "--for"),
    ("override",): ("--service", "--weights", *ACTION_OPTIONS, "--for"),
    ("feature",): ("disable", "enable"),
    ("feature", "disable"): ("NAME", *ACTION_OPTIONS, "--for"),
    ("feature", "enable"): ("NAME", *ACTION_OPTIONS, "--for"),
    ("freeze",): (*ACTION_OPTIONS, "--for"),
    ("unfreeze",): ACTION_OPTIONS,
    ("intent",): ("rm",),
    ("intent", "rm"): ("ID", *ACTION_OPTIONS),
    ("drill",): ("REGION", "start", "stop", "history"),
    ("drill", "start"): (
        "REGION",
        "--service",
        "--duration",
        "--objective",
        "--prometheus",
        "--traffic-query",
        "--error-query",
        "--report",
        "--reason",
        "--yes",
        "--dry-run",
    ),
    ("drill", "stop"): ("--reason",),
    ("drill", "history"): ("--limit",),
}
TOP_LEVEL = {words[0] for words in COMMANDS}
REGIONS = ("cn-east", "cn-south", "cn-north")
SERVICES = ("order", "inventory", "gateway")


def run(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """cpctl without a cluster (help, usage errors, unreachable endpoints)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
    return subprocess.run(
        [CPCTL, *args],
        env={**base, "COLUMNS": "120", **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    where = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == code, where
    assert "Traceback" not in done.stderr, where
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not on stderr; {where}"


# -- help and usage (no cluster) ---------------------------------------------------------


def test_help_lists_every_documented_command() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    sections = done.stdout.split("\nCommands that ", 1)[1]
    listed = set(re.findall(r"^  ([a-z]+)  ", sections, re.MULTILINE))
    assert listed == TOP_LEVEL
    for option in GLOBAL_OPTIONS:
        assert option in done.stdout
    assert "Exit codes" in done.stdout


def test_every_command_has_help_that_names_its_options() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda words: run(*words, "--help"), COMMANDS), strict=True))
    for words, done in results.items():
        name = " ".join(words)
        assert done.returncode == 0, f"cpctl {name} --help: {done.stderr}"
        assert done.stdout.startswith(f"Usage: cpctl {name} "), done.stdout
        for needle in (*COMMANDS[words], *GLOBAL_OPTIONS):
            assert needle in done.stdout, f"cpctl {name} --help does not mention {needle}:\n{done.stdout}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("drain", "cn-east"), "--reason"),
        (("no-such-command",), "No such command"),
        (
            ("override", "--service", "order", "--weights", "cn-east=70,cn-south", "--reason", "x"),
            "REGION=WEIGHT",
        ),
        (("watch", "--count", "0"), "--count"),
        (("drain", "cn-east", "--reason", "x", "--for", "soon"), "--for"),
        (("drain", "cn-east", "--reason", "x", "--for", "0s"), "--for"),
        (("--endpoint", "not a url:x", "status"), "bad endpoint"),
        (("--timeout", "0", "status"), "--timeout"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(run(*args), 2, needle)


def test_no_agent_reachable_exits_3() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    done = run("status", "--endpoint", dead[0], "--endpoint", dead[1])
    assert_one_line_error(done, 3, "no agent reachable", dead[0], dead[1].removeprefix("http://"))
    done = run("drain", "cn-east", "--reason", "x", "--yes", env={"CPCTL_ENDPOINT": ",".join(dead)})
    assert_one_line_error(done, 3, "no agent reachable")


# -- reading ------------------------------------------------------------------------------


@pytest.mark.acceptance
def test_status_shows_the_cluster_and_the_decision(live: Live) -> None:
    done = live.cpctl("status")
    assert done.returncode == 0, done.stderr
    cluster = live.get(live.ids[0], "/v1/cluster")
    assert f"leader {cluster['leader']}" in done.stdout
    assert "quorum yes" in done.stdout
    assert re.search(r"decision revision \d+", done.stdout)
    for name in (*live.ids, *REGIONS, *SERVICES):
        assert name in done.stdout
    assert "features off: none" in done.stdout
    assert "STALE" not in done.stdout
    assert "load balancers" not in done.stdout, "no load balancer reports: no table"


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


def _status_api(live: Live) -> Any:
    agent = live.ids[0]
    members = {a: live.get(a, "/v1/cluster") for a in live.ids}
    return {"cluster": live.get(agent, "/v1/cluster"), "decision": live.decision(agent), "members": members}


VOLATILE = ("commit_index", "stale_s", "cluster_time", "clock_skew_s")


def _status_norm(body: Any) -> Any:
    # The commit index and the clocks move all the time; the decision and the members do not.
    members = {m: _without(v, *VOLATILE) if isinstance(v, dict) else v for m, v in body["members"].items()}
    return {"cluster": _without(body["cluster"], *VOLATILE), "decision": body["decision"], "members": members}


def _weights_api(live: Live) -> Any:
    per_service = {s: live.get(live.ids[0], f"/v1/weights/{s}?format=json") for s in SERVICES}
    revision = per_service[SERVICES[0]]["revision"]
    return {"revision": revision, "stale": False, "services": per_service}


def _observations_norm(body: Any) -> Any:
    # Probes refresh observations all the time: compare who sees what, not when.
    seen = {(o["observer"], o["region"], o["service"]): o["up"] for o in body["observations"]}
    return {"ttl_s": body["ttl_s"], "seen": sorted(seen.items())}


def _same(body: Any) -> Any:
    return body


READS: dict[str, tuple[tuple[str, ...], Callable[[Live], Any], Callable[[Any], Any]]] = {
    "status": (("status",), _status_api, _status_norm),
    "regions": (("regions",), lambda live: live.get(live.ids[0], "/v1/regions"), _same),
    "weights SERVICE": (
        ("weights", "order"),
        lambda live: live.get(live.ids[0], "/v1/weights/order?format=json"),
        _same,
    ),
    "weights": (("weights",), _weights_api, _same),
    "history": (
        ("history", "--limit", "5"),
        lambda live: live.get(live.ids[0], "/v1/history?limit=5"),
        _same,
    ),
    "intents": (("intents",), lambda live: live.get(live.ids[0], "/v1/intents"), _same),
    "observations": (
        ("observations",),
        lambda live: live.get(live.ids[0], "/v1/observations"),
        _observations_norm,
    ),
}


@pytest.mark.acceptance
@pytest.mark.parametrize("name", list(READS))
def test_read_commands_print_the_apis_json(live: Live, name: str) -> None:
    args, api_answer, norm = READS[name]
    for _ in range(10):
        before = norm(api_answer(live))
        printed = norm(live.cpctl_json(*args))
        after = norm(api_answer(live))
        if before == after:  # nothing moved while cpctl ran: the answers must be equal
            assert printed == before
            return
        time.sleep(0.5)
    pytest.fail(f"the answer to {name} kept changing; could not compare")


# -- changing traffic ------------------------------------------------------------------


@pytest.mark.acceptance
def test_drain_takes_the_region_out_everywhere_and_undrain_gives_it_back(restored: Live) -> None:
    live = restored
    base = live.baseline["services"]
    env = {"USER": "tester", "LOGNAME": "tester"}
    result = live.cpctl_json("drain", "cn-east", "--reason", "cli test: drain", "--yes", env=env)
    assert result["in_force"] is True
    for service in SERVICES:
        placement = result["decision"]["services"][service]["cn-east"]
        assert (placement["weight"], placement["state"]) == (0, "drained")
    # cpctl returned only once the agent it used served the revision that carries the drain.
    served = live.decision(live.ids[0])
    assert served["revision"] >= result["revision"]
    assert served["intent_seq"] >= result["seq"]
    live.wait_all(
        lambda d: all(d["services"][s]["cn-east"]["weight"] == 0 for s in SERVICES),
        "cn-east at weight 0 on every agent",
    )
    (standing,) = live.get(live.ids[0], "/v1/intents")["intents"]
    assert standing["id"] == result["id"]
    assert standing["who"] == "admin"  # the token's name, not $USER@host
    assert standing["reason"] == "cli test: drain"

    done = live.cpctl("undrain", "cn-east", "--reason", "cli test: done", "--yes")
    assert done.returncode == 0, done.stderr
    assert "committed undrain cn-east" in done.stdout
    live.wait_all(
        lambda d: all(d["services"][s]["cn-east"]["weight"] == base[s]["cn-east"][0] for s in SERVICES),
        "cn-east back at its base weight on every agent (after the ramp)",
    )


@pytest.mark.acceptance
def test_a_drain_for_a_while_ends_by_itself_without_cpctl(restored: Live) -> None:
    live = restored
    result = live.cpctl_json(
        "drain", "cn-east", "--service", "order", "--reason", "cli test: for", "--for", "2s", "--yes"
    )
    assert result["in_force"] is True
    assert result["decision"]["services"]["order"]["cn-east"]["state"] == "drained"
    (standing,) = live.get(live.ids[1], "/v1/intents")["intents"]
    assert standing["expires_at"] - standing["created_at"] == pytest.approx(2.0, abs=0.01)
    # cpctl has exited: the agents end the drain at its time.
    live.wait_all(
        lambda d: d["services"]["order"]["cn-east"]["state"] != "drained",
        "cn-east/order no longer drained on every agent",
    )
    assert live.get(live.ids[2], "/v1/intents")["intents"] == []
    entries = live.get(live.ids[0], "/v1/history")["entries"]
    assert any(e["kind"] == "intent-removed" and e["who"] == "expiry" for e in entries), entries[-3:]


def test_failover_moves_one_service_only(restored: Live) -> None:
    live = restored
    base = {
        s: {r: w for r, (w, _) in placements.items()} for s, placements in live.baseline["services"].items()
    }
    result = live.cpctl_json(
        "failover", "--from", "cn-east", "--to", "cn-south", "--service", "order",
        "--reason", "cli test: failover", "--yes", "--as", "sre-alice",
    )  # fmt: skip
    assert result["in_force"] is True

    def moved(d: dict[str, Any]) -> bool:
        order = weights(d, "order")
        return (
            order["cn-east"] == 0
            and order["cn-south"] > base["order"]["cn-south"]
            and all(weights(d, s) == base[s] for s in ("inventory", "gateway"))
        )

    assert moved(result["decision"]), result["decision"]["services"]
    live.wait_all(moved, "order (only) moved off cn-east on every agent")
    intents = live.cpctl_json("intents")["intents"]
    assert [(i["kind"], i["from"], i["to"], i["service"], i["who"]) for i in intents] == [
        ("failover", "cn-east", "cn-south", "order", "admin")  # --as goes to the audit log only
    ]

    done = live.cpctl("intent", "rm", result["id"], "--reason", "cli test: done", "--yes")
    assert done.returncode == 0, done.stderr
    assert live.get(live.ids[0], "/v1/intents")["intents"] == []
    live.wait_all(lambda d: weights(d, "order") == base["order"], "order back at its base weights")


@pytest.mark.acceptance
def test_override_feature_and_freeze(restored: Live) -> None:
    live = restored
    done = live.cpctl(
        "override", "--service", "order", "--weights", "cn-east=70,cn-south=30", "-r", "t", "-y"
    )
    assert done.returncode == 0, done.stderr
    live.wait_all(
        lambda d: weights(d, "order") == {"cn-east": 70, "cn-south": 30, "cn-north": 0}, "the override"
    )

    done = live.cpctl("feature", "disable", "comments", "--reason", "cli test", "--yes")
    assert done.returncode == 0, done.stderr
    live.wait_all(lambda d: d["features"]["comments"] is False, "comments off everywhere")
    assert "features off: comments" in done.stdout

    frozen = live.cpctl_json("freeze", "--reason", "cli test", "--yes")
    assert frozen["decision"]["frozen"] is True
    unfrozen = live.cpctl_json("unfreeze", "--reason", "cli test", "--yes")
    assert unfrozen["decision"]["frozen"] is False
    assert unfrozen["revision"] > frozen["revision"]


@pytest.mark.acceptance
def test_dry_run_and_plan_commit_nothing(live: Live) -> None:
    agent = live.ids[0]
    before = live.decision(agent)
    started_at = time.time()
    base_east = live.baseline["services"]["order"]["cn-east"][0]

    done = live.cpctl("drain", "cn-east", "--reason", "cli test: dry run", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"cn-east/order: {base_east} healthy -> 0 drained" in done.stdout
    assert "nothing committed" in done.stdout
    planned = live.cpctl_json("drain", "cn-east", "--reason", "cli test: dry run", "--dry-run")
    assert planned["committed"] is False
    assert planned["services"]["order"]["cn-east"]["state"] == "drained"

    done = live.cpctl("plan", "--fail", "cn-east", "--fail", "cn-south")
    assert done.returncode == 0, done.stderr
    assert "cn-east/order" in done.stdout and "0 down" in done.stdout
    planned = live.cpctl_json("plan", "--fail", "cn-east")
    assert planned["committed"] is False
    assert all(planned["services"][s]["cn-east"]["weight"] == 0 for s in SERVICES)

    after = live.decision(agent)
    assert after["intent_seq"] == before["intent_seq"]
    assert live.get(agent, "/v1/intents")["intents"] == []
    if after["revision"] != before["revision"]:
        # Only automation may have moved meanwhile (a slow probe on a busy machine), never an intent.
        newer = [e for e in live.get(agent, "/v1/history?limit=50")["entries"] if e["at"] >= started_at]
        assert all(e["kind"] == "decision" for e in newer), newer
    assert outcome(after) == outcome(before)


@pytest.mark.acceptance
def test_refused_actions_exit_1_with_the_agents_reason(restored: Live) -> None:
    live = restored
    for region in ("cn-east", "cn-south"):
        status, body = live.api(
            live.ids[0], "/v1/intents", "POST", {"kind": "drain", "region": region, "reason": "cli test"}
        )
        assert status in (201, 202), body
    seq = live.decision(live.ids[0])["intent_seq"]

    done = live.cpctl("drain", "cn-north", "--reason", "cli test: the last one", "--yes")
    assert_one_line_error(done, 1, "would break min_healthy_regions", "409")
    assert "WARNING" in done.stdout  # the plan said so before the agent refused
    done = live.cpctl("freeze", "--reason", "cli test", "--yes", env={"CPCTL_TOKEN": "not-the-token"})
    assert_one_line_error(done, 1, "bad token", "401")
    done = live.cpctl("freeze", "--reason", "cli test", "--yes", env={"CPCTL_TOKEN": ""})
    assert_one_line_error(done, 1, "missing bearer token", "CPCTL_TOKEN")
    done = live.cpctl("drain", "cn-nowhere", "--reason", "cli test", "--yes")
    assert_one_line_error(done, 1, "unknown region 'cn-nowhere'")
    done = live.cpctl("intent", "rm", "no-such-intent", "--reason", "cli test", "--yes")
    assert_one_line_error(done, 1, "no standing intent")
    assert live.decision(live.ids[0])["intent_seq"] == seq


@pytest.mark.acceptance
def test_confirmation_is_asked_on_a_terminal_and_never_hangs_without_one(restored: Live) -> None:
    live = restored
    seq = live.decision(live.ids[0])["intent_seq"]
    done = live.cpctl("drain", "cn-east", "--reason", "cli test")  # stdin is /dev/null
    assert_one_line_error(done, 2, "--yes")

    assert answer_on_a_terminal(live, "n", "drain", "cn-east", "--reason", "cli test").returncode == 1
    assert live.decision(live.ids[0])["intent_seq"] == seq

    done = answer_on_a_terminal(live, "y", "feature", "disable", "likes", "--reason", "cli test")
    assert done.returncode == 0, done.stderr
    assert "Commit feature likes off?" in done.stderr
    live.wait_all(lambda d: d["features"]["likes"] is False, "likes off everywhere")


def answer_on_a_terminal(live: Live, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """cpctl ARGS with a pseudo-terminal as stdin, answering its question with `answer`."""
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen(
            [CPCTL, *args],
            env=live.env(),
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(secondary)
        os.write(primary, f"{answer}\n".encode())
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(primary)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# -- endpoints ---------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.acceptance
def test_an_unreachable_endpoint_is_skipped_for_the_next(restored: Live, blackhole: str) -> None:
    live = restored
    dead = f"http://127.0.0.1:{free_port()}"
    second = live.ids[1]

    body = live.cpctl_json("status", "--endpoint", dead, "--endpoint", live.url(second))
    assert body["decision"]["served_by"] == second
    body = live.cpctl_json("weights", env={"CPCTL_ENDPOINT": f"{dead},{live.url(second)}"})
    assert set(body["services"]) == set(SERVICES)
    body = live.cpctl_json("regions", "--timeout", "2", "-e", blackhole, "-e", live.url(second))
    assert [r["name"] for r in body["regions"]] == list(REGIONS)

    # A write that never left this machine is safe to send to the next agent.
    result = live.cpctl_json("freeze", "--reason", "cli test", "--yes", "-e", dead, "-e", live.url(second))
    assert result["served_by"] == second
    assert result["decision"]["frozen"] is True


# -- watching ------------------------------------------------------------------------------


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.acceptance
def test_watch_shows_each_new_revision_and_stops_after_count(restored: Live) -> None:
    live = restored
    proc = subprocess.Popen(
        [CPCTL, "-o", "json", "watch", "--count", "1"],
        env=live.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = lines_of(proc)
        first = json.loads(lines.get(timeout=60))
        status, body = live.api(
            live.ids[1],
            "/v1/intents",
            "POST",
            {"kind": "feature", "name": "likes", "enabled": False, "reason": "w"},
        )
        assert status in (201, 202), body
        assert proc.wait(timeout=60) == 0
        second = json.loads(lines.get(timeout=10))
    finally:
        proc.kill()
        proc.wait()
    assert second["revision"] > first["revision"]
    assert first["features"]["likes"] is True
    assert second["features"]["likes"] is False or second["intent_seq"] < body["seq"]


@pytest.mark.acceptance
def test_watch_ends_with_ctrl_c_and_exit_0(live: Live) -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec; a handled one is reset to the default, as in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [CPCTL, "watch"],
            env=live.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        lines = lines_of(proc)
        assert lines.get(timeout=60).startswith("revision ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- a partition ----------------------------------------------------------------------------


@pytest.mark.acceptance
def test_a_stale_agent_is_passed_over_for_one_with_quorum(restored: Live) -> None:
    live = restored
    isolated = live.ids[0]  # the first endpoint cpctl is given
    live.isolate(isolated)
    try:
        deadline = time.monotonic() + 60
        while not live.decision(isolated)["stale"]:
            assert time.monotonic() < deadline, f"{isolated} never said it lost quorum"
            time.sleep(0.2)
        # If the isolated agent led, the other two need an election before one has quorum.
        others = [i for i in live.ids if i != isolated]
        while all(live.decision(i)["stale"] for i in others):
            assert time.monotonic() < deadline, f"none of {others} regained quorum"
            time.sleep(0.2)

        body = live.cpctl_json("status")
        assert body["decision"]["served_by"] != isolated
        assert body["decision"]["stale"] is False
        assert body["cluster"]["has_quorum"] is True
        # Actions go to the agent with quorum too: the first endpoint would answer 503.
        result = live.cpctl_json("freeze", "--reason", "cli test: partition", "--yes")
        assert result["served_by"] != isolated
        assert result["decision"]["frozen"] is True

        # Alone, the isolated agent is still worth asking: its answer is shown, marked stale.
        done = live.cpctl("status", "--endpoint", live.url(isolated))
        assert done.returncode == 0, done.stderr
        assert f"STALE: {isolated} lost quorum" in done.stdout
        assert "quorum NO" in done.stdout
    finally:
        live.heal()
