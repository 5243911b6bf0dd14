"""Feature switches and weights for applications, from memory, never blocking.

    async with FlagsClient(["http://10.0.0.1:8700", "http://10.0.0.2:8700"]) as flags:
        if flags.enabled("comments"):
            ...

It follows the decision with `DecisionFollower` (blocking queries, the next agent when
one fails or has lost quorum, never an older revision) in a background task.
`enabled()`, `weights()` and `shed_fraction` read memory only. When every agent is
unreachable it keeps the last known good decision (static stability: a control-plane
outage must not switch an application's features) and says so in `stale`.

For code that is not asyncio, `FlagsClient.start_in_thread()` runs the same loop in a
daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from ssl import SSLContext

from controlplane.client.follower import DecisionFollower
from controlplane.errors import TaskFailed
from controlplane.model import Decision
from controlplane.tasks import spawn

log = logging.getLogger(__name__)


class FlagsClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str | None = None,
        wait_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        backoff_max_s: float = 5.0,
        defaults: Mapping[str, bool] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """`ssl`: the TLS context for https agents (see `controlplane.client.tls.client_context`)."""
        if not endpoints:
            raise ValueError("at least one agent endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._defaults = dict(defaults or {})
        self._follower = DecisionFollower(
            self.endpoints,
            self._take,
            wait_s=wait_s,
            connect_timeout_s=connect_timeout_s,
            max_backoff_s=backoff_max_s,
            token=token,
            start_at_random=True,
            ssl=ssl,
        )
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._listeners: list[Callable[[Decision | None, Decision], None]] = []

    def add_listener(self, listener: Callable[[Decision | None, Decision], None]) -> None:
        """Call `listener(previous, new)` with each new decision, before readers see it.

        It runs in the client's event loop (its thread with `start_in_thread`) and must
        not block; an exception is logged and does not stop the client.
        """
        self._listeners.append(listener)

    # -- reading (never blocks) ----------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._follower.applied_revision

    @property
    def decision(self) -> Decision | None:
        """The last known good decision (typed), or None before the first answer."""
        return self._follower.applied

    @property
    def stale(self) -> bool:
        """True before the first decision, when no agent answers, or the agents lost quorum."""
        return self._follower.stale

    def enabled(self, feature: str, default: bool | None = None) -> bool:
        """Whether `feature` is on in the last known decision (or its default)."""
        decision = self.decision
        if decision is not None and feature in decision.features:
            return bool(decision.features[feature])
        if default is not None:
            return default
        return self._defaults.get(feature, True)

    def weights(self, service: str) -> dict[str, int]:
        decision = self.decision
        if decision is None:
            return {}
        return {region: p.weight for region, p in decision.services.get(service, {}).items()}

    @property
    def shed_fraction(self) -> float:
        decision = self.decision
        return decision.shed_fraction if decision is not None else 0.0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stop = asyncio.Event()
            self._changed = asyncio.Event()
            self._task = spawn("controlplane flags client", self._follower.run(self._stop), self._failed)

    def _failed(self, failure: TaskFailed) -> None:
        # Inside someone else's process: log loudly and keep the last known decision.
        log.critical("%s; flags stay at revision %d", failure, self.revision, exc_info=failure.cause)

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> FlagsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _take(self, decision: Decision) -> None:
        previous = self.decision
        for listener in self._listeners:
            try:
                listener(previous, decision)
            except Exception:
                log.exception("flags listener %r failed", listener)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for_revision(self, revision: int, timeout_s: float) -> bool:
        """Wait (bounded) until the client holds a revision past `revision`."""
        deadline = time.monotonic() + timeout_s
        while self.revision <= revision:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await event.wait()
        return True

    def start_in_thread(self) -> None:
        """Run the following loop in a daemon thread (for code without asyncio)."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                await self.start()
                ready.set()
                assert self._task is not None
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

            loop.run_until_complete(main())
            loop.close()

        self._thread = threading.Thread(target=run, name="controlplane-flags", daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop_thread(self, timeout_s: float = 5.0) -> None:
        if self._thread is None or self._thread_loop is None or self._task is None:
            return
        self._thread_loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout_s)
        self._thread = None
