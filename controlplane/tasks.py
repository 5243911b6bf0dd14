"""Named long-lived tasks, started in order, stopped in reverse, never lost silently.

Every long-lived task in the package starts through `spawn` (one named task whose end,
by return or exception, is logged with its name and handed to `on_failure`) or through
a `Supervisor`, which uses it. Modelled on kopf's reactor and its `guard()`: a daemon is
a handful of tasks (probing, publishing, deciding, serving HTTP; following, applying and
reconciling in an LB adapter). If one ends (returns or raises) while it is meant to be
running, that is a bug or a fatal condition: it is logged with its name and traceback
and the whole process shuts down with a non-zero exit code, so a supervisor (systemd,
Kubernetes) restarts it, instead of limping on without, say, its probes. A library
inside someone else's process (the client SDK) logs instead and keeps its last state.

A stop request (SIGTERM, SIGINT) cancels the tasks in reverse start order, each with a
timeout, then runs the cleanup callbacks in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from controlplane.errors import TaskFailed

log = logging.getLogger(__name__)


FailureHandler = Callable[[TaskFailed], None]


def log_failure(failure: TaskFailed) -> None:
    log.critical("%s", failure, exc_info=failure.cause)


def spawn(
    name: str, coro: Coroutine[Any, Any, Any], on_failure: FailureHandler = log_failure
) -> asyncio.Task[Any]:
    """Run `coro` as a task named `name` that is meant to run until cancelled.

    If it ends any other way (returns, or raises), `on_failure` gets a `TaskFailed` naming
    it; the default logs it at CRITICAL with its traceback. Cancellation is the normal
    end and is not reported. The caller keeps the task and cancels or awaits it.
    """

    def done(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        on_failure(TaskFailed(name, task.exception()))

    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(done)
    return task


async def run_alongside(
    main: Coroutine[Any, Any, Any], stop: asyncio.Event, helpers: dict[str, Coroutine[Any, Any, Any]]
) -> int:
    """Run `main` with `helpers` beside it until `stop`; 1 if a helper died, else 0.

    Each helper runs until `stop` is set (it must return then). One that ends before,
    or raises, is logged by name and sets `stop`, so the process exits non-zero instead
    of carrying on without it. `main` must return once `stop` is set.
    """
    failures: list[TaskFailed] = []

    def failed(failure: TaskFailed) -> None:
        if stop.is_set() and failure.cause is None:
            return  # it returned because it was told to stop
        failures.append(failure)
        log.critical("%s; stopping", failure, exc_info=failure.cause)
        stop.set()

    tasks = [spawn(name, coro, failed) for name, coro in helpers.items()]
    try:
        await main
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if failures else 0


@dataclass
class Supervisor:
    stop_timeout_s: float = 5.0
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _cleanups: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _failure: TaskFailed | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a named task that must live until the daemon stops."""
        task = spawn(name, coro, self._on_failure)
        self._tasks.append(task)
        return task

    def on_stop(self, name: str, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Register a cleanup, run after the tasks are cancelled, in reverse order."""
        self._cleanups.append((name, cleanup))

    def request_stop(self, why: str = "") -> None:
        if not self._stopping.is_set():
            log.info("stopping%s", f": {why}" if why else "")
            self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")

    @property
    def failure(self) -> TaskFailed | None:
        return self._failure

    def fail(self, failure: TaskFailed) -> None:
        """Stop everything because `failure` happened (also the handler for `spawn`)."""
        self._on_failure(failure)

    def _on_failure(self, failure: TaskFailed) -> None:
        if self._stopping.is_set():
            return
        self._failure = failure
        log.critical("%s; shutting down", failure, exc_info=failure.cause)
        self._stopping.set()

    async def wait(self) -> None:
        """Block until a stop is requested or a task fails, then stop everything.

        Raises `TaskFailed` if a task ended on its own.
        """
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()
        if self._failure is not None:
            raise self._failure

    async def shutdown(self) -> None:
        """Cancel every task (reverse start order), then run the cleanups (reverse order)."""
        self._stopping.set()
        for task in reversed(self._tasks):
            if task.done():
                continue
            task.cancel()
            await asyncio.wait({task}, timeout=self.stop_timeout_s)
            if not task.done():
                log.error("task %r did not stop within %.1f s", task.get_name(), self.stop_timeout_s)
        for name, cleanup in reversed(self._cleanups):
            try:
                await asyncio.wait_for(cleanup(), self.stop_timeout_s)
            except Exception:
                log.exception("cleanup %r failed", name)
        self._cleanups.clear()
