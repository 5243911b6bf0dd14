"""The shedding helper: deterministic by key, monotone as the fraction moves, never high priority."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from controlplane.client.middleware import Classifier, RequestClass
from controlplane.client.shedding import MemoryGuard, Shedder, ShedMetrics, bucket_of

KEYS = [f"user-{i}" for i in range(10_000)]


class Decided:
    """A decision's fraction and features, set by the test."""

    def __init__(self) -> None:
        self.shed_fraction = 0.0
        self.off: set[str] = set()

    def enabled(self, feature: str, default: bool | None = None) -> bool:
        return feature not in self.off


def test_buckets_are_stable_and_spread_evenly() -> None:
    assert bucket_of("user-42") == bucket_of("user-42")
    assert bucket_of("user-42") != bucket_of("user-43")
    buckets = [bucket_of(k) for k in KEYS]
    assert all(0.0 <= b < 1.0 for b in buckets)
    # Each tenth of [0, 1) gets about a tenth of the keys.
    for tenth in range(10):
        share = sum(1 for b in buckets if tenth / 10 <= b < (tenth + 1) / 10) / len(buckets)
        assert 0.08 < share < 0.12, (tenth, share)


@given(st.text(max_size=200))
def test_any_key_has_a_bucket(key: str) -> None:
    assert 0.0 <= bucket_of(key) < 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.385, 0.5, 0.9, 1.0])
def test_the_share_shed_is_the_fraction_and_high_priority_is_never_shed(fraction: float) -> None:
    decided = Decided()
    decided.shed_fraction = fraction
    shedder = Shedder.of(decided)
    low = sum(shedder.check(k, "low").shed for k in KEYS) / len(KEYS)
    high = sum(shedder.check(k, "high").shed for k in KEYS)
    assert abs(low - fraction) < 0.02, low
    assert high == 0
    assert shedder.metrics.admitted["high"] == len(KEYS)


def test_the_same_user_stays_in_or_out_while_the_fraction_holds() -> None:
    decided = Decided()
    decided.shed_fraction = 0.3
    shedder = Shedder.of(decided)
    first = {k: shedder.check(k, "low").shed for k in KEYS[:500]}
    for _ in range(5):
        assert {k: shedder.check(k, "low").shed for k in KEYS[:500]} == first


def test_as_the_fraction_grows_the_users_shed_stay_shed() -> None:
    decided = Decided()
    shedder = Shedder.of(decided)
    previous: set[str] = set()
    for fraction in (0.05, 0.1, 0.2, 0.385, 0.6, 0.9, 1.0):
        decided.shed_fraction = fraction
        shed = {k for k in KEYS if shedder.check(k, "low").shed}
        assert previous <= shed, f"someone shed at a lower fraction was let back in at {fraction}"
        previous = shed
    for fraction in (0.6, 0.2, 0.0):  # and back down: only ever let in
        decided.shed_fraction = fraction
        shed = {k for k in KEYS if shedder.check(k, "low").shed}
        assert shed <= previous
        previous = shed
    assert previous == set()


def test_a_request_without_a_key_gets_a_random_draw() -> None:
    decided = Decided()
    decided.shed_fraction = 0.5
    shedder = Shedder(lambda: decided.shed_fraction, rng=random.Random(7))
    share = sum(shedder.check(None, "low").shed for _ in range(4000)) / 4000
    assert 0.45 < share < 0.55


def test_a_switched_off_feature_is_refused_at_any_priority() -> None:
    decided = Decided()
    decided.off = {"comments"}
    shedder = Shedder.of(decided)
    verdict = shedder.check("user-1", "high", feature="comments")
    assert verdict.shed and verdict.why == "feature" and verdict.feature == "comments"
    assert not shedder.check("user-1", "low", feature="likes").shed


class FakeMemory:
    def __init__(self) -> None:
        self.used = 0
        self.reads = 0

    def __call__(self) -> tuple[int, int]:
        self.reads += 1
        return self.used, 1000


def test_the_memory_guard_sheds_above_its_threshold_and_says_so_in_the_metrics() -> None:
    memory = FakeMemory()
    now = [0.0]
    guard = MemoryGuard(0.8, read_usage=memory, sample_interval_s=1.0, clock=lambda: now[0])
    metrics = ShedMetrics()
    decided = Decided()
    shedder = Shedder.of(decided, memory_guard=guard, metrics=metrics)

    memory.used = 700
    assert not any(shedder.check(k, "low").shed for k in KEYS[:1000])
    memory.used = 850  # halfway from 80 % (nothing) to 90 % (everything)
    assert not any(shedder.check(k, "low").shed for k in KEYS[:1000]), "sampled at most once a second"
    now[0] = 1.0
    share = sum(shedder.check(k, "low").shed for k in KEYS) / len(KEYS)
    assert abs(share - 0.5) < 0.02
    assert shedder.check("user-1", "high").shed is False
    assert memory.reads == 2
    verdict = next(v for k in KEYS if (v := shedder.check(k, "low")).shed)
    assert verdict.why == "memory"
    text = generate_latest(metrics.registry).decode()
    assert "controlplane_client_memory_utilization 0.85" in text
    assert "controlplane_client_memory_guard_shed_fraction 0.49999" in text  # (0.85 - 0.8) / 0.1
    assert 'controlplane_client_requests_shed_total{priority="low",why="memory"}' in text

    # The decision's fraction applies when it is the larger one.
    decided.shed_fraction = 0.9
    verdict = next(v for k in KEYS if (v := shedder.check(k, "low")).shed)
    assert verdict.why == "decision" and verdict.fraction == 0.9


def test_the_memory_guard_reads_this_process_by_default() -> None:
    guard = MemoryGuard(0.8)
    used = guard.sample()
    assert 0.0 < used < 0.8, "a test process uses some memory, well under its limit"


def test_guard_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        MemoryGuard(1.2)
    with pytest.raises(ValueError, match="full_at"):
        MemoryGuard(0.8, full_at=0.7)


def test_the_classifier_reads_headers_then_paths() -> None:
    classify = Classifier(
        low_priority_paths=["/recommendations", "/feed"],
        high_priority_paths=["/checkout", "/feed/urgent"],
        features={"/comments": "comments", "/comments/likes": "likes"},
    )
    assert classify("/feed/today", {"x-user-id": "u1"}, "10.0.0.1") == RequestClass("low", "u1")
    assert classify("/feed/urgent/1", {}, "10.0.0.1") == RequestClass("high", "10.0.0.1")
    assert classify("/checkout", {"x-priority": "low"}, None).priority == "low", "the header wins"
    assert classify("/feed", {"x-priority": "bogus"}, None).priority == "low"
    assert classify("/other", {}, None).priority == "high", "only what is marked low is ever shed"
    assert classify("/comments/likes/9", {}, None).feature == "likes"
    assert classify("/comments/9", {}, None).feature == "comments"
