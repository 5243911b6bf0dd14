"""Named long-lived tasks, started in order, stopped in reverse, never lost silently.

Modelled on kopf's reactor: the daemon is a handful of tasks (probing, publishing,
deciding, serving HTTP). If any of them ends (returns or raises) while the daemon is
meant to be running, that is a bug or a fatal condition: it is logged with its name and
traceback and the whole daemon shuts down with a non-zero exit code, so a supervisor
(systemd, Kubernetes) restarts it, instead of limping on without, say, its probes.

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

log = logging.getLogger(__name__)


class TaskFailed(Exception):
    """A supervised task ended while the daemon was running."""

    def __init__(self, name: str, cause: BaseException | None) -> None:
        what = f"raised {type(cause).__name__}: {cause}" if cause else "returned"
        super().__init__(f"task {name!r} {what}")
        self.name = name
        self.cause = cause


@dataclass
class Supervisor:
    stop_timeout_s: float = 5.0
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _cleanups: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _failure: TaskFailed | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a named task that must live until the daemon stops."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_done)
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

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if self._stopping.is_set() or task.cancelled():
            return
        cause = task.exception()
        self._failure = TaskFailed(task.get_name(), cause)
        log.critical("%s; shutting down", self._failure, exc_info=cause)
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
