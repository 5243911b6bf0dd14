"""The prober on a thread and event loop of its own, so that serving cannot delay probing.

An agent's HTTP API may hold ten thousand watchers and answer a flood of reads on its
main event loop; probes that shared that loop timed out because the loop was late, not
the targets (bench/README.md, issue 15). `ProberThread` runs the `Prober`, its HTTP
session and its periodic refresh on a dedicated thread with its own loop. The only
thing that crosses to the caller's loop is delivery: `deliver(observations)` (a write
to the consensus store, which belongs to the main loop) is run there with
`run_coroutine_threadsafe` and awaited from the prober's loop, bounded by the prober's
callback timeout. A late delivery delays an observation, never falsifies it: the store
stamps it when it is committed.

What the API still shares with the prober is the GIL: a busy main thread can delay the
prober thread by a switch interval or so, which the prober's own lateness rules
(`timing.py`) absorb.

Lifecycle: `start()` returns once the prober runs (or raises what stopped it from
starting); `stop()` stops it, closes the session, ends the loop and joins the thread.
A probing task that dies is handed to `on_task_failure` on the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from controlplane.errors import ControlplaneError, TaskFailed
from controlplane.model import Observation
from controlplane.probes.prober import OnResult, Prober
from controlplane.probes.target import ProbeTarget
from controlplane.tasks import FailureHandler, log_failure

log = logging.getLogger(__name__)

Deliver = Callable[[list[Observation]], Coroutine[Any, Any, None]]
JOIN_TIMEOUT_S = 10.0


class ProberThread:
    """Probes `targets` for `observer` on a thread of its own; see the module docstring.

    `deliver` runs on the loop that called `start()` with every batch of changed
    observations, and with all current ones every `refresh_s` (so that they stay fresh
    in the store). `on_result` runs on the prober's thread after every probe (metrics;
    prometheus_client is thread-safe).
    """

    def __init__(
        self,
        observer: str,
        targets: Sequence[ProbeTarget],
        *,
        deliver: Deliver,
        refresh_s: float,
        on_result: OnResult | None = None,
        slow_ms: float | None = None,
        max_concurrency: int = 16,
        session_timeout_s: float = 10.0,
        on_task_failure: FailureHandler = log_failure,
    ) -> None:
        self.observer = observer
        self.targets = tuple(targets)
        self._deliver = deliver
        self._refresh_s = refresh_s
        self._on_result = on_result
        self._slow_ms = slow_ms
        self._max_concurrency = max_concurrency
        self._session_timeout_s = session_timeout_s
        self.on_task_failure = on_task_failure
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self.prober: Prober | None = None

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("prober thread already started")
        self._main = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"prober {self.observer}", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(self._started)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The prober's own event loop while it runs (for metrics: count its tasks)."""
        loop = self._loop
        return None if loop is None or loop.is_closed() else loop

    def impaired(self) -> str | None:
        """Why this agent's own probes are unreliable now (see `Prober.impaired`), or None."""
        prober = self.prober
        return None if prober is None else prober.impaired()

    def set_slow_ms(self, slow_ms: float | None) -> None:
        """Take a reloaded policy's "slow" threshold (from any thread)."""
        self._slow_ms = slow_ms
        loop, prober = self.loop, self.prober
        if loop is not None and prober is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(prober.set_slow_ms, slow_ms)

    async def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("prober thread did not stop within %.0f s", JOIN_TIMEOUT_S)
        self._thread = None

    # -- the prober's thread ---------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            else:
                self._fail(TaskFailed(f"prober thread of {self.observer}", exc))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_concurrency, force_close=True),
            timeout=aiohttp.ClientTimeout(total=self._session_timeout_s),
        )
        prober = Prober(
            self.observer,
            self.targets,
            on_change=self._on_change,
            on_result=self._on_result,
            session=session,
            slow_ms=self._slow_ms,
            max_concurrency=self._max_concurrency,
            on_task_failure=self._fail,
        )
        self.prober = prober
        refresh: asyncio.Task[None] | None = None
        try:
            await prober.start()
            refresh = asyncio.create_task(self._refresh(prober), name="prober refresh")
            refresh.add_done_callback(self._refresh_ended)
            self._started.set_result(None)
            await self._stop.wait()
        finally:
            if refresh is not None:
                refresh.cancel()
                await asyncio.gather(refresh, return_exceptions=True)
            await prober.stop()
            await session.close()

    async def _on_change(self, observations: list[Observation]) -> None:
        """Deliver on the main loop and wait for it here (cancelled with it)."""
        main = self._main
        if main is None:
            return
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            self._deliver(observations), main
        )
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def _refresh(self, prober: Prober) -> None:
        """Republish every current observation so that it stays fresh in the store."""
        warned = False
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                current = prober.current()
                if current:
                    async with asyncio.timeout(max(self._refresh_s, 1.0) * 5):
                        await self._on_change(current)
                warned = False
            except (ControlplaneError, TimeoutError) as e:
                if not warned:
                    log.warning("cannot refresh observations: %s (will keep trying)", e)
                    warned = True

    def _refresh_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._fail(TaskFailed("prober refresh", task.exception()))

    def _fail(self, failure: TaskFailed) -> None:
        """Hand a failure to the owner's handler, on the owner's loop."""
        main = self._main
        if main is None or main.is_closed():
            log_failure(failure)
            return
        try:
            main.call_soon_threadsafe(self.on_task_failure, failure)
        except RuntimeError:
            log_failure(failure)
