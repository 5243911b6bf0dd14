"""The agent's probing loop: every target on its own schedule, changes pushed to a callback.

One task per target probes it every `interval_s`, starting at a random offset within
the first interval so that many targets (and many agents) do not probe in lockstep. A
semaphore caps how many probes are in flight at once. Each result goes through
rise/fall counting (`health.py`); when the up/down state of a (region, service),
whether it is slow, or whether it is inconclusive differs from what was last delivered,
the (region, service) is marked dirty and a separate notifier task hands the fresh
observations to `on_change`. HTTP and TCP targets are probed by `checks.check`;
Prometheus targets by a `PrometheusCheck` each (`prometheus.py`), which keeps what a
query needs between probes (how long a condition has held, which server answered).

"Slow" means up with a latency above `slow_ms` (see `health.is_slow`); it is not
debounced here, because the decision engine already requires a quorum of observers to
agree before it calls a (region, service) degraded.

Delivery is decoupled from probing on purpose: `on_change` usually writes to the
consensus store and may take a while, and probes must keep their rhythm meanwhile (a
stalled probe loop would itself look like an outage once observations expire). Pending
changes are coalesced per (region, service), so the backlog is bounded by the number of
services, and the callback always sees the latest state. If the callback fails or times
out, the same changes are retried after `retry_s`, backing off to `max_retry_s`; the
caller's periodic refresh from `current()` is the second safety net.

Its own timing (`timing.py`): a probe whose deadline fired late because this process
lagged is inconclusive, never a failure, and while the prober's loop lags (more than
`timing.IMPAIRED_LAG_S` during a probe, or within the last `impaired_hold_s`) every
observation it delivers says `impaired`, with the lateness measured, so `decide()` does
not count this agent as a witness. The daemon runs the prober on a thread and event
loop of its own (`isolated.ProberThread`) so that API load does not reach it at all;
these rules are the safety net for what still does (the GIL, a paused VM).

Guarantees: every network await is bounded by the target's timeout; `stop()` cancels and
awaits every task it started and closes the HTTP session if the prober created it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import aiohttp

from controlplane.errors import ControlplaneError
from controlplane.model import Observation
from controlplane.probes import checks
from controlplane.probes.health import TargetHealth, is_slow, summarize
from controlplane.probes.prometheus import PrometheusCheck
from controlplane.probes.target import ProbeResult, ProbeTarget
from controlplane.probes.timing import IMPAIRED_HOLD_MIN_S, IMPAIRED_LAG_S, LagMonitor, judge_timing
from controlplane.tasks import FailureHandler, log_failure, spawn

log = logging.getLogger(__name__)

OnChange = Callable[[list[Observation]], Awaitable[None]]
OnResult = Callable[[ProbeTarget, ProbeResult], None]
ServiceKey = tuple[str, str]
# (up, slow, inconclusive, impaired) as last delivered; up is None while unknown.
_Status = tuple[bool | None, bool, bool, bool]


class Prober:
    """Probes `targets` on behalf of agent `observer` and reports what changed.

    `on_change(observations)` is awaited (at most `callback_timeout_s`) with one
    observation per (region, service) whose up/down, slow or inconclusive status changed.
    `on_result(target, result)` is called synchronously after every probe, for metrics. `wall_clock` stamps
    observations; `rng` only decides start offsets. With no `session`, the prober opens
    its own (no connection reuse) and closes it in `stop()`. A probing task that dies
    is handed to `on_task_failure` (the daemon stops the agent: an agent that does not
    probe must not keep reporting stale observations).
    """

    def __init__(
        self,
        observer: str,
        targets: Sequence[ProbeTarget],
        *,
        on_change: OnChange | None = None,
        on_result: OnResult | None = None,
        session: aiohttp.ClientSession | None = None,
        slow_ms: float | None = None,
        max_concurrency: int = 16,
        wall_clock: Callable[[], float] = time.time,
        callback_timeout_s: float = 10.0,
        retry_s: float = 0.1,
        max_retry_s: float = 1.0,
        rng: random.Random | None = None,
        on_task_failure: FailureHandler = log_failure,
        clock: Callable[[], float] = time.monotonic,
        impaired_hold_s: float | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 (got {max_concurrency})")
        if len(set(targets)) != len(targets):
            raise ValueError("duplicate probe targets")
        self.observer = observer
        self.targets: tuple[ProbeTarget, ...] = tuple(targets)
        self._on_change = on_change
        self._on_result = on_result
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._slow_ms = slow_ms
        self._max_concurrency = max_concurrency
        self._wall_clock = wall_clock
        self._callback_timeout_s = callback_timeout_s
        self._retry_s = retry_s
        self._max_retry_s = max(retry_s, max_retry_s)
        self._failed_since: float | None = None  # the first failed delivery of this outage
        self._failed_attempts = 0
        self._rng = rng or random.Random()
        self.on_task_failure = on_task_failure
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._health = {t: TargetHealth.of(t) for t in self.targets}
        self._prometheus = {t: PrometheusCheck(t) for t in self.targets if t.kind == "prometheus"}
        self._groups: dict[ServiceKey, list[ProbeTarget]] = {}
        for t in self.targets:
            self._groups.setdefault(t.key, []).append(t)
        self._delivered: dict[ServiceKey, _Status] = dict.fromkeys(self._groups, (None, False, False, False))
        self._clock = clock
        self.lag = LagMonitor(clock=clock)
        # Stay impaired long enough for a quorum's worth of probes to be judged again.
        self._impaired_hold_s = impaired_hold_s or max(
            [IMPAIRED_HOLD_MIN_S, *(2 * t.interval_s * t.fall for t in self.targets)]
        )
        self._late_at: float | None = None  # monotonic time of the last late probe
        self._late_s = 0.0  # the worst lateness within the hold
        self._impaired = False  # as the observations last said
        self._dirty: set[ServiceKey] = set()
        self._wakeup = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start one probing task per target and the notifier."""
        if self._tasks:
            raise RuntimeError("prober already started")
        self._tasks.append(spawn("prober notifier", self._notify_loop(), self.on_task_failure))
        self._tasks.append(spawn("prober lag monitor", self.lag.run(), self.on_task_failure))
        for target in self.targets:
            name = f"probe {target.region}/{target.service} {target.address}"
            self._tasks.append(spawn(name, self._probe_loop(target), self.on_task_failure))

    async def stop(self) -> None:
        """Cancel and await every task; close the session if this prober opened it."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session is not None:
            session, self._own_session = self._own_session, None
            await session.close()

    async def __aenter__(self) -> Prober:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- probing ---------------------------------------------------------------------

    async def probe_once(self, target: ProbeTarget) -> ProbeResult:
        """Probe `target` now and count the result; changes are delivered by `flush()`."""
        health = self._health[target]
        prometheus = self._prometheus.get(target)
        async with self._semaphore:
            started = self._clock()
            if prometheus is not None:
                result = await prometheus.check(self._http())
            else:
                result = await checks.check(self._http(), target)
        result, lateness = judge_timing(target, result, self.lag.lag_since(started))
        self._note_lateness(lateness)
        health.record(result, self._wall_clock())
        if self._on_result is not None:
            try:
                self._on_result(target, result)
            except Exception:
                log.exception("on_result hook failed for %s", target.address)
        key = target.key
        if self._impaired != (self.impaired() is not None):
            # Every pair's observation changes with it.
            self._impaired = not self._impaired
            why = self.impaired()
            if why is not None:
                log.warning("%s probes are unreliable: %s; observations say impaired", self.observer, why)
            else:
                log.info("%s probes are on time again; observations no longer say impaired", self.observer)
            self._dirty.update(self._groups)
            self._wakeup.set()
        elif self._status(key) != self._delivered[key]:
            self._dirty.add(key)
            self._wakeup.set()
        return result

    def _note_lateness(self, lateness_s: float) -> None:
        if lateness_s <= IMPAIRED_LAG_S:
            return
        now = self._clock()
        if self._late_at is None or now - self._late_at > self._impaired_hold_s:
            self._late_s = lateness_s
        else:
            self._late_s = max(self._late_s, lateness_s)
        self._late_at = now

    def impaired(self) -> str | None:
        """Why this observer's own probes cannot be trusted now, or None when they can."""
        if self._late_at is None or self._clock() - self._late_at > self._impaired_hold_s:
            return None
        return f"probe deadlines fired up to {round(self._late_s * 1000)} ms late (its own process lagged)"

    async def _probe_loop(self, target: ProbeTarget) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._rng.uniform(0.0, target.interval_s))
        next_at = loop.time()
        while True:
            try:
                await self.probe_once(target)
            except Exception:
                # A bug here must not silently end this target's probing.
                log.exception("probe of %s failed unexpectedly", target.address)
            next_at += target.interval_s
            now = loop.time()
            # After an overrun (slow probe, semaphore wait) start the next probe now
            # rather than firing a burst to catch up.
            next_at = max(next_at, now)
            await asyncio.sleep(next_at - now)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own_session is None:
            self._own_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=self._max_concurrency)
            )
        return self._own_session

    # -- state and delivery ----------------------------------------------------------

    def current(self) -> list[Observation]:
        """The latest observation of every (region, service) that is no longer unknown."""
        out = []
        for key in self._groups:
            observation = self._summary(key)
            if observation is not None:
                out.append(observation)
        return out

    def set_slow_ms(self, slow_ms: float | None) -> None:
        """A new "slow" threshold (a reloaded policy); every pair is judged again and what
        changes is delivered. Call it on the prober's loop."""
        if slow_ms == self._slow_ms:
            return
        self._slow_ms = slow_ms
        self._dirty.update(self._groups)
        self._wakeup.set()

    def target_up(self, target: ProbeTarget) -> bool | None:
        """One target's rise/fall state: True, False, or None while unknown."""
        return self._health[target].up

    async def flush(self) -> bool:
        """Deliver pending changes to `on_change` now; False if the callback failed."""
        async with self._flush_lock:
            keys = [k for k in self._groups if k in self._dirty]
            self._dirty.clear()
            changed: list[Observation] = []
            statuses: dict[ServiceKey, _Status] = {}
            for key in keys:
                observation = self._summary(key)
                status = self._status_of(observation)
                if observation is not None and status != self._delivered[key]:
                    changed.append(observation)
                    statuses[key] = status
            if changed and self._on_change is not None:
                try:
                    async with asyncio.timeout(self._callback_timeout_s):
                        await self._on_change(changed)
                except (ControlplaneError, TimeoutError) as e:
                    # Expected while the store has no leader (an election, a partition).
                    self._delivery_failed(len(changed), e, expected=True)
                    self._dirty.update(statuses)
                    return False
                except Exception as e:
                    self._delivery_failed(len(changed), e, expected=False)
                    self._dirty.update(statuses)
                    return False
                if self._failed_since is not None:
                    log.info(
                        "observations delivered after %d attempts over %.1f s",
                        self._failed_attempts + 1,
                        self._clock() - self._failed_since,
                    )
                    self._failed_since, self._failed_attempts = None, 0
            self._delivered.update(statuses)
            return True

    def _delivery_failed(self, count: int, error: BaseException, expected: bool) -> None:
        """Log the first expected failure of an outage (an election fails a few in a row)."""
        self._failed_attempts += 1
        first = self._failed_since is None
        if first:
            self._failed_since = self._clock()
        if not expected:  # a bug, not an election: every one with its traceback
            log.error("on_change failed; will retry %d change(s)", count, exc_info=error)
        elif first:
            log.warning("cannot deliver %d change(s) yet: %s; will retry", count, error)
        else:
            log.debug("delivery attempt %d failed: %s", self._failed_attempts, error)

    def _retry_delay(self) -> float:
        """`retry_s` after the first failure, doubling up to `max_retry_s`.

        The first retry comes soon: a down observation waits for it, and an election
        (the usual cause) is over in well under a second.
        """
        return min(self._max_retry_s, self._retry_s * (1 << min(16, max(0, self._failed_attempts - 1))))

    async def _notify_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not await self.flush():
                await asyncio.sleep(self._retry_delay())
                self._wakeup.set()

    def _summary(self, key: ServiceKey) -> Observation | None:
        region, service = key
        observation = summarize(self.observer, region, service, [self._health[t] for t in self._groups[key]])
        if observation is not None and self._impaired:
            observation = replace(observation, impaired=self.impaired())
        return observation

    def _status(self, key: ServiceKey) -> _Status:
        return self._status_of(self._summary(key))

    def _status_of(self, observation: Observation | None) -> _Status:
        up = None if observation is None else observation.up
        inconclusive = observation is not None and observation.inconclusive is not None
        impaired = observation is not None and observation.impaired is not None
        return (up, is_slow(observation, self._slow_ms), inconclusive, impaired)
