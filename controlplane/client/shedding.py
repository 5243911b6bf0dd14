"""Shed low-priority requests by the decision's `shed_fraction`, the same users every time.

The decision publishes the fraction of low-priority requests to shed when the serving
regions cannot carry the demand even with features off. `Shedder` applies it in the
application:

- **Deterministic by key.** A request's key (a user or session id) is hashed into
  [0, 1) (`bucket_of`); a low-priority request is shed when its bucket is below the
  fraction. The same user is therefore either served or shed for as long as the
  fraction stays, not flipped in and out request by request, and as the fraction grows
  the users already shed stay shed (the shed set only grows; it shrinks the same way).
  Over many users the share shed is the fraction. A request without a key gets a random
  draw.
- **Never high priority.** High-priority requests (checkout, payments, health checks)
  are never shed, by the decision or by the memory guard.
- **Features.** `feature_off(name)` says whether the decision switched a feature off,
  for a middleware to refuse the requests that belong to it.
- **A local memory guard** (optional, `MemoryGuard`): the seed's 80 % rule inside the
  process. Above `threshold` of its memory limit the process sheds low-priority
  requests by itself, from nothing at the threshold to all of them at `full_at`, with
  the same key hashing, whatever the decision says; the larger of the two fractions
  applies. Its readings and what it sheds are in the metrics.

`ShedMetrics` puts the counts on a prometheus_client registry (pass the application's
own `REGISTRY` to see them on its `/metrics`), and keeps plain totals for tests.

Everything here reads memory and does no I/O on the request path; the memory guard
reads `/proc/self/statm` at most once per `sample_interval_s`.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

Priority = Literal["high", "low"]


class Flags(Protocol):
    """What a shedder reads: a `FlagsClient`, or a stand-in with the same two members."""

    @property
    def shed_fraction(self) -> float: ...

    def enabled(self, feature: str, default: bool | None = None) -> bool: ...


_SCALE = float(1 << 64)


def bucket_of(key: str) -> float:
    """Where `key` falls in [0, 1): the same for the same key, in every process, on every host."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one request: `shed` or not, and why (`decision`, `memory`, `feature`)."""

    shed: bool
    why: str = ""
    fraction: float = 0.0
    feature: str | None = None


ADMIT = Verdict(False)


class MemoryGuard:
    """This process's memory use against its limit, sampled at most every `sample_interval_s`.

    The limit is `limit_bytes`, else the cgroup's (v2 `memory.max`, v1
    `memory.limit_in_bytes`), else the machine's physical memory. `read_usage` (tests)
    returns (used, limit) bytes instead of reading them. The shed fraction grows linearly
    from 0 at `threshold` to 1 at `full_at`.
    """

    def __init__(
        self,
        threshold: float = 0.8,
        *,
        full_at: float | None = None,
        limit_bytes: int | None = None,
        sample_interval_s: float = 1.0,
        read_usage: Callable[[], tuple[int, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1 (got {threshold})")
        self.threshold = threshold
        self.full_at = full_at if full_at is not None else min(1.0, threshold + 0.1)
        if not self.full_at > threshold:
            raise ValueError(f"full_at must be above threshold (got {self.full_at})")
        self.sample_interval_s = sample_interval_s
        self._limit = limit_bytes
        self._read = read_usage or self._read_process
        self._clock = clock
        self._sampled_at: float | None = None
        self.utilization = 0.0

    def sample(self) -> float:
        """Memory used / limit now (cached for `sample_interval_s`)."""
        now = self._clock()
        if self._sampled_at is None or now - self._sampled_at >= self.sample_interval_s:
            self._sampled_at = now
            used, limit = self._read()
            self.utilization = used / limit if limit > 0 else 0.0
        return self.utilization

    def fraction(self) -> float:
        """The share of low-priority requests to shed for memory: 0 below the threshold."""
        used = self.sample()
        if used <= self.threshold:
            return 0.0
        return min(1.0, (used - self.threshold) / (self.full_at - self.threshold))

    def _read_process(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0, 0
        if self._limit is None:
            self._limit = memory_limit_bytes()
        return resident_pages * page, self._limit


def memory_limit_bytes() -> int:
    """The cgroup memory limit of this process, else the machine's physical memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class ShedMetrics:
    """Counts of admitted and shed requests, on `registry` (a private one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.admitted_total = Counter(
            "controlplane_client_requests_admitted", "Requests let through", ["priority"], registry=r
        )
        self.shed_total = Counter(
            "controlplane_client_requests_shed",
            "Requests refused: shed (decision or memory) or their feature off",
            ["priority", "why"],
            registry=r,
        )
        self.shed_fraction = Gauge(
            "controlplane_client_shed_fraction", "Fraction of low-priority requests shed now", registry=r
        )
        self.memory_utilization = Gauge(
            "controlplane_client_memory_utilization", "This process's memory used / limit", registry=r
        )
        self.memory_guard_fraction = Gauge(
            "controlplane_client_memory_guard_shed_fraction",
            "Fraction the local memory guard sheds (0 below its threshold)",
            registry=r,
        )
        self.admitted: dict[str, int] = {"high": 0, "low": 0}
        self.shed: dict[str, int] = {}

    def count(self, priority: Priority, verdict: Verdict) -> None:
        if verdict.shed:
            self.shed_total.labels(priority, verdict.why).inc()
            key = f"{priority}/{verdict.why}"
            self.shed[key] = self.shed.get(key, 0) + 1
        else:
            self.admitted_total.labels(priority).inc()
            self.admitted[priority] = self.admitted.get(priority, 0) + 1


class Shedder:
    """Decides, per request, from the decision (`shed_fraction`, `feature_enabled`) and memory.

    `shed_fraction` and `feature_enabled` read the decision, usually a `FlagsClient`'s
    (`Shedder.of(flags)`); they must not block.
    """

    def __init__(
        self,
        shed_fraction: Callable[[], float],
        *,
        feature_enabled: Callable[[str], bool] | None = None,
        memory_guard: MemoryGuard | None = None,
        metrics: ShedMetrics | None = None,
        retry_after_s: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        self._shed_fraction = shed_fraction
        self._feature_enabled = feature_enabled
        self.memory_guard = memory_guard
        self.metrics = metrics or ShedMetrics()
        self.retry_after_s = retry_after_s
        self._rng = rng or random.Random()

    @classmethod
    def of(
        cls,
        flags: Flags,
        *,
        memory_guard: MemoryGuard | None = None,
        metrics: ShedMetrics | None = None,
        retry_after_s: int = 5,
    ) -> Shedder:
        """A shedder that reads a `FlagsClient` (or anything with `shed_fraction` and `enabled`)."""
        return cls(
            lambda: flags.shed_fraction,
            feature_enabled=flags.enabled,
            memory_guard=memory_guard,
            metrics=metrics,
            retry_after_s=retry_after_s,
        )

    def fractions(self) -> tuple[float, float]:
        """(the decision's fraction, the memory guard's), each clamped to [0, 1]."""
        decided = min(max(self._shed_fraction(), 0.0), 1.0)
        memory = 0.0
        if self.memory_guard is not None:
            memory = self.memory_guard.fraction()
            self.metrics.memory_utilization.set(self.memory_guard.utilization)
            self.metrics.memory_guard_fraction.set(memory)
        return decided, memory

    def check(self, key: str | None, priority: Priority, feature: str | None = None) -> Verdict:
        """Whether to shed one request; counted in the metrics."""
        verdict = self._verdict(key, priority, feature)
        self.metrics.count(priority, verdict)
        return verdict

    def _verdict(self, key: str | None, priority: Priority, feature: str | None) -> Verdict:
        if feature is not None and self._feature_enabled is not None and not self._feature_enabled(feature):
            return Verdict(True, "feature", feature=feature)
        decided, memory = self.fractions()
        fraction = max(decided, memory)
        self.metrics.shed_fraction.set(fraction)
        if priority != "low" or fraction <= 0.0:
            return ADMIT
        bucket = bucket_of(key) if key else self._rng.random()
        if bucket >= fraction:
            return ADMIT
        return Verdict(True, "memory" if memory > decided else "decision", fraction)
