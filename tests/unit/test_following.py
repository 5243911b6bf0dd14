"""The rules every decision follower obeys (`controlplane.client.following`), without I/O."""

from __future__ import annotations

import random

from controlplane.client.following import Following, Served, parse_answer
from controlplane.model import Decision


def served(revision: int, agent: str = "a", *, epoch: str = "e1", stale: bool = False) -> Served:
    decision = Decision(revision=revision, services={}, features={}, epoch=epoch)
    return Served(decision=decision, agent=agent, stale=stale)


def follow(agents: int = 3) -> Following:
    return Following(
        [f"http://a{i}" for i in range(agents)], retry_s=0.2, max_backoff_s=2.0, rng=random.Random(1)
    )


def take(f: Following, s: Served) -> bool:
    new = f.on_served(s)
    if new is not None:
        f.on_applied(new)
    return new is not None


def test_only_newer_revisions_are_taken() -> None:
    f = follow()
    assert take(f, served(5))
    assert not take(f, served(5))
    assert not take(f, served(3))  # an agent that lags cannot roll the reader back
    assert take(f, served(6))
    assert f.revision == 6


def test_a_new_epoch_resets_the_fence_even_at_a_lower_revision() -> None:
    f = follow()
    assert take(f, served(40, epoch="old"))
    # The cluster was rebuilt from scratch: its revisions start again at 1.
    assert take(f, served(1, epoch="new"))
    assert f.revision == 1 and f.last is not None and f.last.decision.epoch == "new"
    assert f.newer(served(2, epoch="new")) and not f.newer(served(1, epoch="new"))


def test_a_stale_answer_is_taken_if_newer_but_moves_to_the_next_agent() -> None:
    f = follow()
    first = f.agent
    assert take(f, served(7, agent=first, stale=True))
    assert f.agent != first
    assert f.stale
    assert take(f, served(8, agent=f.agent))
    assert not f.stale


def test_pauses_only_after_a_whole_round_missed_and_grow_bounded() -> None:
    f = follow(3)
    pauses = []
    for _ in range(3 * 8):
        f.on_error(f.agent, "refused")
        pauses.append(f.pause_s())
    between_rounds = [p for i, p in enumerate(pauses) if (i + 1) % 3]
    at_rounds = [p for i, p in enumerate(pauses) if (i + 1) % 3 == 0]
    assert all(p == 0 for p in between_rounds), "the other agents are tried at once"
    assert all(0 < p <= 2.0 for p in at_rounds)
    assert at_rounds[-1] > at_rounds[0]
    assert f.request().index == 0  # nothing known: ask for anything


def test_an_answer_that_is_not_a_decision_is_an_error_in_words() -> None:
    assert parse_answer("a", 503, {}, {"error": "no quorum"}) == "HTTP 503: no quorum"
    assert isinstance(parse_answer("a", 200, {}, [1, 2]), str)
    assert isinstance(parse_answer("a", 200, {}, {"revision": "x"}), str)
    ok = parse_answer("a", 200, {"X-Controlplane-Stale": "3.0"}, {"revision": 4, "services": {}})
    assert isinstance(ok, Served) and ok.stale and ok.revision == 4
