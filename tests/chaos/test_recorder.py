"""The recorder's memory bound: identical answers merge, each content is kept once."""

from __future__ import annotations

from controlplane.testing.chaos.recorder import Recorder


def served(revision: int, stale: bool = False, agent: str = "a1") -> dict[str, object]:
    return {"revision": revision, "epoch": "", "services": {}, "stale": stale, "served_by": agent}


def test_identical_answers_merge_and_changes_do_not() -> None:
    r = Recorder({"a1": "http://127.0.0.1:1", "a2": "http://127.0.0.1:2"}, "token")
    for i in range(5):
        r.record("a1", "poll", 200, served(1), lo=float(i), hi=i + 0.1)
    r.record("a2", "poll", 200, served(1, agent="a2"), lo=0.0, hi=0.1)  # same content
    r.record("a1", "poll", 200, served(1, stale=True), lo=5.0, hi=5.1)  # stale: a new record
    r.record("a1", "poll", 0, None, lo=6.0, hi=7.0)
    r.record("a1", "poll", 0, None, lo=7.0, hi=8.0)
    assert [(x["agent"], x["revision"], x["stale"], x["count"]) for x in r.reads] == [
        ("a1", 1, False, 5),
        ("a2", 1, False, 1),
        ("a1", 1, True, 1),
        ("a1", None, None, 2),
    ]
    first = r.reads[0]
    assert (first["first_lo"], first["first_hi"], first["last_lo"], first["last_hi"]) == (0.0, 0.1, 4.0, 4.1)
    assert len(r.contents) == 1  # served_by and stale are not content
    assert r.reads[-1]["last_hi"] == 8.0


def test_bounded() -> None:
    r = Recorder({"a1": "http://127.0.0.1:1"}, "token", max_records=3, max_contents=2)
    for revision in range(1, 6):
        r.record("a1", "poll", 200, served(revision), lo=float(revision), hi=revision + 0.1)
    assert len(r.reads) <= 3 and len(r.contents) <= 2
    assert r.truncated
