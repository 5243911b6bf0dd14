"""Operator text is data, never markup and never terminal control, through the real cpctl.

An intent reason of `[/]` once made `cpctl intents` fail for every operator (rich read
it as markup), and `cpctl history` passed escape sequences (clear screen, window title)
to the terminal. The agents now refuse control characters in reasons; cpctl shows any
server text literally and strips control characters from it, whichever server sent it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.cli.conftest import CPCTL, Live

MARKUP = "[/] [bold red]not bold[/bold red] [link=http://evil.example]x[/link] :smile: [/]"
EVIL = "\x1b[2J\x1b[H\x1b]0;pwned-title\x07cleared\x9b31m\x08\x7f\r!"
CONTROL = [chr(c) for c in [*range(0, 9), *range(11, 32), *range(0x7F, 0xA0)]]


@pytest.mark.acceptance
def test_a_reason_that_looks_like_markup_is_shown_as_written(restored: Live) -> None:
    live = restored
    status, answer = live.api(
        live.ids[0],
        "/v1/intents",
        "POST",
        {"kind": "feature", "name": "comments", "enabled": False, "reason": MARKUP},
    )
    assert status == 201, answer
    for args in (["intents"], ["history", "-n", "5"], ["status"]):
        done = live.cpctl(*args)
        assert done.returncode == 0, (args, done.stderr)
        if args[0] == "intents":
            assert MARKUP in done.stdout.replace("\n", ""), (args, done.stdout)


@pytest.mark.acceptance
@pytest.mark.parametrize("bad", ["\x1b[2J", "line\nbreak", "bell\x07", "c1\x9b31m", "nul\x00"])
def test_the_agent_refuses_control_characters_in_a_reason_and_changes_nothing(
    restored: Live, bad: str
) -> None:
    live = restored
    before = live.decision(live.ids[0])["revision"]
    status, answer = live.api(
        live.ids[0], "/v1/intents", "POST", {"kind": "drain", "region": "cn-east", "reason": f"x {bad} y"}
    )
    assert status == 400, answer
    assert answer["error"] == "invalid request" and "control character" in answer["detail"], answer
    assert live.get(live.ids[0], "/v1/intents")["intents"] == []
    assert live.decision(live.ids[0])["revision"] == before


class Hostile(BaseHTTPRequestHandler):
    """An agent (or something posing as one) whose every string carries terminal control."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        body: dict[str, Any]
        if path == "/v1/history":
            body = {
                "entries": [
                    {"kind": "intent" + EVIL, "at": 1.0, "revision": 3, "summary": "drain " + EVIL,
                     "intent_id": "abc" + EVIL, "who": "mallory" + EVIL, "weights": None},
                ],
                "next_before": None,
                "total": 1,
            }  # fmt: skip
        elif path == "/v1/intents":
            body = {
                "intents": [
                    {"id": "i1" + EVIL, "kind": "drain", "region": "cn-east" + EVIL, "service": None,
                     "who": "mallory" + EVIL, "reason": MARKUP + EVIL, "created_at": 1.0, "seq": 1},
                ],
                "intent_seq": 1,
            }  # fmt: skip
        elif path == "/v1/decision":
            body = {
                "revision": 3,
                "committed_at": "2026-01-01T00:00:00Z",
                "leader": "a" + EVIL,
                "served_by": "a",
                "services": {},
                "features": {},
                "reasons": [],
            }
        elif path == "/v1/cluster":
            body = {"cluster": "c", "agent": "a", "has_quorum": True, "leader": "a", "members": []}
        elif path == "/v1/lbs":
            body = {
                "revision": 3,
                "limit": 1024,
                "lbs": [
                    {
                        "name": "hap" + EVIL,
                        "adapter": "haproxy" + EVIL,
                        "applied_revision": 2,
                        "applied_epoch": None,
                        "applied_at": 1.0,
                        "desired_revision": 3,
                        "reported_at": 1.0,
                        "age_s": 0.4,
                        "ok": False,
                        "error": "socket gone " + MARKUP + EVIL,
                        "heartbeat_s": 5.0,
                        "lag_revisions": 1,
                        "state": "failing" + EVIL,
                    },
                ],
            }
        else:
            self.send_response(503)
            body = {"error": "nope" + EVIL, "detail": "hostile" + EVIL}
            data = json.dumps(body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def cpctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
    env.update({"CPCTL_ENDPOINT": endpoint, "CPCTL_TOKEN": "t" * 20, "COLUMNS": "300", "NO_COLOR": "1"})
    return subprocess.run(
        [CPCTL, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args",
    [["history"], ["intents"], ["regions"], ["history", "-o", "json"], ["status"], ["status", "-o", "json"]],
)
def test_cpctl_passes_no_control_characters_to_the_terminal(hostile: str, args: list[str]) -> None:
    done = cpctl(hostile, *args)
    shown = done.stdout + done.stderr
    assert not [c for c in CONTROL if c in shown], repr(shown)
    if args == ["history"]:
        assert done.returncode == 0, done.stderr
        assert "mallory" in done.stdout and "cleared" in done.stdout and "pwned-title" in done.stdout
    if args == ["intents"]:
        assert done.returncode == 0, done.stderr
        assert MARKUP in done.stdout.replace("\n", "")
    if args == ["regions"]:
        assert done.returncode != 0 and "hostile" in done.stderr
    if args == ["status"]:
        assert done.returncode == 0, done.stderr
        assert "load balancers (1)" in done.stdout
        assert "cleared" in done.stdout and "pwned-title" in done.stdout
        assert MARKUP in done.stdout.replace("\n", ""), done.stdout
    if args == ["history", "-o", "json"]:
        assert json.loads(done.stdout)["entries"][0]["who"] == "mallory" + EVIL  # the data, escaped
    if args == ["status", "-o", "json"]:
        assert json.loads(done.stdout)["lbs"]["lbs"][0]["error"].endswith(EVIL)  # the data, escaped
