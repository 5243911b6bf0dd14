"""Whether a probe's own timing can be trusted: an agent that lags must not report outages.

A probe that times out says "the target did not answer within `timeout_s`" only if its
deadline fired on time. When the prober's own process lags (a busy event loop, a thread
waiting for the GIL, a paused VM), a deadline can fire hundreds of milliseconds late,
and an answer that arrived in time may never have been read: the timeout is then a fact
about this agent, not about the target. bench/README.md found exactly that: an agent
busy with 10,000 watchers reported every region down.

Two measures, both cheap:

- the probe's own overrun: a timeout cannot legitimately be measured later than its
  deadline (`deadline_s`); anything beyond is lateness;
- `LagMonitor`: a task on the prober's loop that wakes every `tick_s` and records how
  late each wake-up was, so a stall during a probe is seen even when the probe's own
  duration looks plausible (an answer and a deadline both ready when the loop resumes).

`judge_timing` combines them: a timed-out probe whose lateness exceeds
`LATE_TOLERANCE_S` becomes inconclusive (never a failure: it counts neither way), and
any probe during which the loop lagged more than `IMPAIRED_LAG_S` marks this observer's
timing as unreliable for a while (the prober then publishes `impaired` observations,
which `decide()` does not count as witnesses). Nothing here reads the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from controlplane.probes.target import ProbeResult, ProbeTarget

# A timeout measured later than its deadline by more than this was not the target's fault.
LATE_TOLERANCE_S = 0.025
# A stall longer than this makes every probe of the moment suspect, successes included
# (their latency is inflated): the observer says it is impaired.
IMPAIRED_LAG_S = 0.1
# How long an observer keeps saying it is impaired after its last late probe, at least.
IMPAIRED_HOLD_MIN_S = 5.0
# HTTP probes are capped a little after their timeout (see checks._CAP_SLACK_S).
HTTP_CAP_SLACK_S = 0.05


def deadline_s(target: ProbeTarget) -> float:
    """The latest a probe of `target` can legitimately end when its loop is on time."""
    if target.kind == "http":
        return target.timeout_s + HTTP_CAP_SLACK_S
    return target.timeout_s


def judge_timing(target: ProbeTarget, result: ProbeResult, lag_s: float) -> tuple[ProbeResult, float]:
    """`result`, made inconclusive if it timed out late, and this probe's lateness (s).

    `lag_s` is the largest lateness of the prober's loop seen while the probe ran. The
    lateness returned is the larger of that and the probe's overrun of its deadline
    (0 when on time). Only a timeout depends on timing: a refused connection or an HTTP
    503 is an answer from the target however late it was read.
    """
    lateness = max(0.0, lag_s, result.duration_s - deadline_s(target))
    if result.timed_out and not result.inconclusive and lateness > LATE_TOLERANCE_S:
        why = f"probe deadline fired {round(lateness * 1000)} ms late (this agent lagged): inconclusive"
        result = replace(result, ok=False, error=why, inconclusive=True)
    return result, lateness


class LagMonitor:
    """How late the event loop it runs on wakes up, over the last `window` ticks.

    Start `run()` as a task on the loop to watch; `lag_since(t)` is the largest lateness
    of any wake-up since monotonic time `t`, counting a wake-up that is overdue right now
    (the loop has not come round to it yet).
    """

    def __init__(
        self, tick_s: float = 0.05, window: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tick_s = tick_s
        self._clock = clock
        self._wakes: deque[tuple[float, float]] = deque(maxlen=window)
        self._due: float | None = None

    async def run(self) -> None:
        while True:
            due = self._clock() + self.tick_s
            self._due = due
            await asyncio.sleep(self.tick_s)
            now = self._clock()
            self._wakes.append((now, max(0.0, now - due)))

    def record(self, woke_at: float, lateness_s: float) -> None:
        """Note one wake-up (for tests and for loops that measure themselves)."""
        self._wakes.append((woke_at, max(0.0, lateness_s)))

    def lag_since(self, since: float) -> float:
        worst = 0.0
        for woke_at, late in reversed(self._wakes):
            if woke_at < since:
                break
            worst = max(worst, late)
        if self._due is not None:
            worst = max(worst, self._clock() - self._due)
        return worst
