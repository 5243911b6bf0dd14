"""Expiry as a property of an intent: which stand, which ended, how they read and travel."""

from __future__ import annotations

import pytest

from controlplane.cpctl import render
from controlplane.cpctl.actions import parse_duration
from controlplane.intents import active, expired
from controlplane.model import Intent, IntentKind, intent_from_json, intent_to_json


def drain(intent_id: str, seq: int, expires_at: float | None) -> Intent:
    return Intent(
        id=intent_id,
        kind=IntentKind.DRAIN,
        reason="maintenance",
        who="alice",
        created_at=1000.0,
        seq=seq,
        region=f"r{seq}",
        expires_at=expires_at,
    )


def test_an_intent_ends_at_its_time_not_before() -> None:
    standing = {"a": drain("a", 1, 1060.0), "b": drain("b", 2, None), "c": drain("c", 3, 1030.0)}
    assert expired(standing, 1029.999) == []
    assert [i.id for i in expired(standing, 1030.0)] == ["c"]
    assert [i.id for i in expired(standing, 5000.0)] == ["a", "c"], "oldest first"
    assert set(active(standing, 1045.0)) == {"a", "b"}
    assert set(active(standing, 10**9)) == {"b"}, "without expires_at it stands"


def test_expiry_survives_json_and_reads_in_the_description() -> None:
    intent = drain("a", 1, 1_800_000_000.0)
    assert intent_from_json(intent_to_json(intent)) == intent
    assert "until 2027-01-15T08:00:00.000Z" in intent.describe()
    plain = drain("b", 2, None)
    assert "expires_at" not in intent_to_json(plain)
    assert intent_from_json(intent_to_json(plain)) == plain
    assert "until" not in plain.describe()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5m", 90.0),
    ],
)
def test_durations_cpctl_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "1h 30m", "-5m", "soon"])
def test_durations_cpctl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_cpctl_intents_says_when_each_ends() -> None:
    body = {"intents": [intent_to_json(drain("a", 1, 1000.0 + 1800)), intent_to_json(drain("b", 2, None))]}
    console = render.make_console()
    with console.capture() as captured:
        console.print(render.intents(body, now=1000.0))
    text = captured.get()
    assert "in 30 min 0 s" in text
    assert "when removed" in text
