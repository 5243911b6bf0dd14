"""cpctl during an outage (issue 19): agents that hang, trickle or answer junk, wrong tokens.

Given a misbehaving server first in --endpoint and the real cluster after it, cpctl
moves on and says so once; given only the misbehaving one, it fails with one line
naming it, never with an empty table.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.cli.conftest import Live
from tests.cli.fakes import answering, fake_agent, hung, trickling

pytestmark = pytest.mark.acceptance


def assert_failed(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    where = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == code, where
    assert "Traceback" not in done.stderr, where
    assert len(done.stderr.strip().splitlines()) == 1, where
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not on stderr; {where}"


def test_a_hung_agent_is_passed_over_after_a_short_wait_and_said_once(live: Live) -> None:
    good = live.url(live.ids[1])
    with fake_agent(hung) as stuck:
        # status makes several calls; the hung agent is named once, with the short wait.
        done = live.cpctl("status", "--timeout", "30", "-e", stuck, "-e", good)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("not answering") == 1, done.stderr
        assert f"agent {stuck} not answering (no answer within 2 s), using {good}" in done.stderr
        assert "quorum yes" in done.stdout

        # Alone, it gets the whole --timeout, then one line naming it.
        done = live.cpctl("intents", "--timeout", "3", "-e", stuck)
        assert_failed(done, 3, stuck, "no answer within 3 s")


def test_a_trickling_agent_cannot_hold_cpctl_past_its_timeout(live: Live) -> None:
    good = live.url(live.ids[0])
    with fake_agent(trickling) as slow:
        # It sends its first byte at once, so only the deadline for the whole answer stops it.
        done = live.cpctl("intents", "--timeout", "3", "-e", slow)
        assert_failed(done, 3, slow, "answer not complete within 3 s")
        done = live.cpctl("-o", "json", "intents", "--timeout", "3", "-e", slow, "-e", good)
        assert done.returncode == 0, done.stderr
        assert f"agent {slow} not answering (answer not complete within 3 s), using {good}" in done.stderr


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"<html><body>Sign in to the guest wifi</body></html>", "text/html", "not JSON"),
        (b'{"status": "ok"}', "application/json", "has no 'intents'"),
        (b'{"intents": "none", "intent_seq": 0}', "application/json", "'intents' is not a list"),
        (b"[]", "application/json", "not a JSON object"),
    ],
)
def test_junk_answers_are_an_error_naming_the_agent(
    live: Live, body: bytes, content_type: str, why: str
) -> None:
    with fake_agent(answering(body, content_type)) as junk:
        done = live.cpctl("intents", "-e", junk)
        assert_failed(done, 3, junk, why)
        assert "no standing intents" not in done.stdout
        assert done.stdout == ""

        done = live.cpctl("intents", "-e", junk, "-e", live.url(live.ids[2]))
        assert done.returncode == 0, done.stderr
        assert f"agent {junk} not answering as an agent" in done.stderr
        assert "no standing intents" in done.stdout  # the real agent's answer


def test_wrong_shapes_are_caught_for_every_read_command(live: Live) -> None:
    with fake_agent(answering(b'{"revision": "42"}')) as junk:
        for args in (("regions",), ("history",), ("observations",), ("weights",), ("status",)):
            done = live.cpctl(*args, "-e", junk)
            assert_failed(done, 3, junk, "not as an agent")
            assert done.stdout == "", args
