"""A small client for applications: feature flags and weights that never block.

    async with FlagsClient(["http://10.0.0.1:8700", "http://10.0.0.2:8700"]) as flags:
        if flags.enabled("comments"):
            ...

It long-polls one agent at a time (`/v1/decision?index=N&wait=...`), moves to the next
agent when one does not answer, and never goes back to an older revision than the one
it holds. When every agent is unreachable it keeps serving the last known good decision
(static stability: a control-plane outage must not switch an application's features) and
says so in `stale`. `enabled()` and `weights()` read memory only; they never wait.

For code that is not asyncio, `FlagsClient.start_in_thread()` runs the same loop in a
daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

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
    ) -> None:
        if not endpoints:
            raise ValueError("at least one agent endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._token = token
        self._wait_s = wait_s
        self._connect_timeout_s = connect_timeout_s
        self._backoff_max_s = backoff_max_s
        self._defaults = dict(defaults or {})
        self._decision: dict[str, Any] | None = None
        self._last_ok: float | None = None
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- reading (never blocks) ----------------------------------------------------------

    @property
    def revision(self) -> int:
        return int(self._decision["revision"]) if self._decision else 0

    @property
    def decision(self) -> dict[str, Any] | None:
        return self._decision

    @property
    def stale(self) -> bool:
        """True when the last poll failed everywhere, or the agent said it lost quorum."""
        if self._decision is None:
            return True
        return self._failures >= len(self.endpoints) or bool(self._decision.get("stale"))

    def enabled(self, feature: str, default: bool | None = None) -> bool:
        """Whether `feature` is on in the last known decision (or its default)."""
        if self._decision is not None:
            value = self._decision.get("features", {}).get(feature)
            if value is not None:
                return bool(value)
        if default is not None:
            return default
        return self._defaults.get(feature, True)

    def weights(self, service: str) -> dict[str, int]:
        if self._decision is None:
            return {}
        placements = self._decision.get("services", {}).get(service, {})
        return {region: int(p["weight"]) for region, p in placements.items()}

    @property
    def shed_fraction(self) -> float:
        return float(self._decision.get("shed_fraction", 0.0)) if self._decision else 0.0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="controlplane flags client")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> FlagsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for_revision(self, revision: int, timeout_s: float) -> bool:
        """Wait (bounded) until the client holds a revision past `revision`."""
        deadline = time.monotonic() + timeout_s
        while self.revision <= revision:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
        return True

    def start_in_thread(self) -> None:
        """Run the polling loop in a daemon thread (for code without asyncio)."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            asyncio.set_event_loop(loop)
            self._changed = asyncio.Event()
            self._task = loop.create_task(self._follow())
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
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

    # -- the loop ------------------------------------------------------------------------

    def _accept(self, decision: dict[str, Any]) -> None:
        revision = int(decision.get("revision", 0))
        if self._decision is not None and revision < self.revision:
            return  # an agent behind the others: never go back
        changed = revision != self.revision
        self._decision = decision
        if changed:
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def _follow(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        timeout = aiohttp.ClientTimeout(total=self._wait_s + 10, sock_connect=self._connect_timeout_s)
        index = random.randrange(len(self.endpoints))
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                endpoint = self.endpoints[index % len(self.endpoints)]
                url = f"{endpoint}/v1/decision?index={self.revision}&wait={self._wait_s:g}s"
                try:
                    async with session.get(url) as r:
                        if r.status != 200:
                            raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                        self._accept(await r.json())
                    self._failures = 0
                    self._last_ok = time.time()
                    continue
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    self._failures += 1
                    log.debug("agent %s did not answer: %s", endpoint, e)
                index += 1
                if self._failures % len(self.endpoints) == 0:
                    rounds = self._failures // len(self.endpoints)
                    delay = min(self._backoff_max_s, 0.2 * 2**rounds)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
