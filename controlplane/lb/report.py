"""Adapters report back to the agents: what they applied, when, and what is wrong.

The control plane decides; without this it never learns what the data plane did. An
adapter (HAProxy or nginx) hands every update of its status (`StatusFile`) to one
`Reporter`, which tells every agent it follows, `POST /v1/lbs/{name}`::

    {"adapter": "haproxy", "applied_revision": 42, "applied_epoch": "k3j...",
     "applied_at": 1767000000.1, "desired_revision": 42, "ok": true, "error": null,
     "heartbeat_s": 5.0}

when what it would say changes (a revision applied, an apply failed, an error cleared)
and otherwise every `heartbeat_s`, so an agent tells a silent adapter from a quiet one.

What it guarantees:

- applying never waits for it: a status update only replaces the body to send and wakes
  the senders;
- bounded: one sender per agent, each with at most one report in flight; a report not
  yet sent is replaced by a newer one (the latest state wins), nothing queues;
- every POST has a timeout (`timeout_s`, 2 s by default), and the agents are told
  concurrently, so a dead or slow agent delays no other;
- a failure to report is logged once per agent when it starts or changes, and once
  when that agent takes reports again; it never stops the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from ssl import SSLContext
from typing import Any

import aiohttp
import orjson

from controlplane.client.follower import DecisionFollower, apply_once
from controlplane.lb.status import StatusFile
from controlplane.lbreports import ERROR_MAX_CHARS, valid_name
from controlplane.tasks import run_alongside

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
REPORT_TIMEOUT_S = 2.0

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+")
_NOT_NAME = re.compile(r"[^A-Za-z0-9._@-]")


def default_name(adapter: str, hostname: str | None = None) -> str:
    """`<adapter>@<hostname>`, cut to fit the names the agents take."""
    host = _NOT_NAME.sub("-", hostname if hostname is not None else socket.gethostname()) or "localhost"
    return f"{adapter}@{host}"[:64]


def one_line(text: str, limit: int = ERROR_MAX_CHARS) -> str:
    """`text` on one line, without control characters, at most `limit` characters."""
    flat = " ".join(_CONTROL.sub(" ", text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def report_body(adapter: str, status: Mapping[str, Any], heartbeat_s: float) -> dict[str, Any]:
    """The report an adapter's status (`StatusFile.data`) makes."""
    problems = [str(e) for e in status.get("errors") or ()]
    if status.get("error"):
        problems.append(str(status["error"]))
    error = one_line("; ".join(problems)) if problems else None
    return {
        "adapter": adapter,
        # 0 is what the adapters hold before they applied anything.
        "applied_revision": status.get("applied_revision") or None,
        "applied_epoch": status.get("applied_epoch") or None,
        "applied_at": status.get("applied_at"),
        "desired_revision": status.get("revision") or None,
        "ok": status.get("ok"),
        "error": error or None,
        "heartbeat_s": heartbeat_s,
    }


class Reporter:
    """Tells every agent in `agents` (base URLs) the latest status of adapter `name`."""

    def __init__(
        self,
        agents: Sequence[str],
        name: str,
        adapter: str,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        token: str | None = None,
        timeout_s: float = REPORT_TIMEOUT_S,
        ssl: SSLContext | None = None,
    ) -> None:
        """`ssl`: the TLS context for https agents (a private CA, a client certificate)."""
        if not valid_name(name):
            raise ValueError(f"bad load balancer name {name!r}")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0 (got {heartbeat_s})")
        self.agents = [a.rstrip("/") for a in agents]
        self.name = name
        self.adapter = adapter
        self.heartbeat_s = heartbeat_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ssl = ssl
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.body = report_body(adapter, {}, heartbeat_s)
        # One per agent: set when there is something new to tell it.
        self._wake = {agent: asyncio.Event() for agent in self.agents}
        self._problem: dict[str, str | None] = {}  # by agent: why the last report failed
        self.sent = 0
        self.failed = 0

    def update(self, status: Mapping[str, Any]) -> None:
        """`StatusFile` listener: take the new body, wake the senders when it changed."""
        body = report_body(self.adapter, status, self.heartbeat_s)
        if body == self.body:
            return
        self.body = body
        for wake in self._wake.values():
            wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Report to every agent until `stop` is set: at once, on change, and every heartbeat."""
        async with self._session() as session:
            senders = [
                asyncio.create_task(self._keep_reporting(session, agent, stop), name=f"report to {agent}")
                for agent in self.agents
            ]
            stopping = asyncio.create_task(stop.wait())
            try:
                # A sender ends only when it is stopped, or by a bug: that must not pass unseen.
                await asyncio.wait({stopping, *senders}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopping, *senders):
                    task.cancel()
                await asyncio.gather(stopping, *senders, return_exceptions=True)
        for task in senders:
            if not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} failed") from task.exception()

    async def flush(self) -> None:
        """Report once to every agent, concurrently (`--once`: before the process exits)."""
        async with self._session() as session:
            await asyncio.gather(*(self._send(session, agent) for agent in self.agents))

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
        return aiohttp.ClientSession(timeout=self.timeout, connector=connector)

    async def _keep_reporting(self, session: aiohttp.ClientSession, agent: str, stop: asyncio.Event) -> None:
        wake = self._wake[agent]
        wake.set()  # the first report goes at once: the agents learn the adapter exists
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await wake.wait()
            wake.clear()
            await self._send(session, agent)

    async def _send(self, session: aiohttp.ClientSession, agent: str) -> bool:
        """POST the current body to `agent`; whether it took it."""
        url = f"{agent}/v1/lbs/{self.name}"
        try:
            async with session.post(url, data=orjson.dumps(self.body), headers=self._headers) as r:
                if r.status == 200:
                    problem = None
                else:
                    problem = f"answered {r.status}: {await _reason(r)}"
                    if r.status in (401, 403):
                        problem += " (reports need a token of scope lb: --token)"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            problem = one_line(f"{type(e).__name__}: {e}".rstrip(": ") if str(e) else type(e).__name__, 300)
        self._note(agent, problem)
        return problem is None

    def _note(self, agent: str, problem: str | None) -> None:
        before = self._problem.get(agent)
        if problem is None:
            self.sent += 1
            if before is not None:
                log.info("reporting to %s again", agent)
        else:
            self.failed += 1
            if problem != before:
                log.warning("cannot report to %s: %s; the adapter carries on", agent, problem)
        self._problem[agent] = problem


def reporter_for(
    status: StatusFile,
    agents: Sequence[str],
    *,
    name: str | None = None,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    token: str | None = None,
    ssl: SSLContext | None = None,
) -> Reporter | None:
    """The reporter of the adapter whose status is `status`, listening to it; None when
    reporting is off (`heartbeat_s` 0)."""
    if heartbeat_s == 0:
        log.info("not reporting to the agents (--report-s 0)")
        return None
    reporter = Reporter(
        agents,
        name or default_name(status.adapter),
        status.adapter,
        heartbeat_s=heartbeat_s,
        token=token,
        ssl=ssl,
    )
    status.listen(reporter.update)
    log.info("reporting to the agents as %s every %g s and on every change", reporter.name, heartbeat_s)
    return reporter


async def _reason(r: aiohttp.ClientResponse) -> str:
    """An agent's error answer in a few words (`{"error", "detail"}` or the text)."""
    text = (await r.content.read(2000)).decode(errors="replace")
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return one_line(text, 300) or "(no body)"
    if isinstance(body, dict) and "error" in body:
        return one_line(f"{body.get('error')}: {body.get('detail') or ''}".rstrip(": "), 300)
    return one_line(text, 300)


async def follow_and_report(
    follower: DecisionFollower,
    status: StatusFile,
    reporter: Reporter | None,
    stop: asyncio.Event,
    *,
    once: bool,
    once_timeout_s: float,
    helpers: Mapping[str, Callable[[], Coroutine[Any, Any, Any]]],
) -> int:
    """An adapter's run, the same for every kind: with `once`, apply one decision (exit 0
    when the status says ok, bounded by `once_timeout_s`) and send the report it makes;
    otherwise follow until `stop` with the reporter and the adapter's own `helpers`
    (started only then) beside it. The exit code."""
    if once:
        code = await apply_once(follower, stop, lambda: bool(status.data.get("ok")), timeout_s=once_timeout_s)
        if reporter is not None:
            await reporter.flush()
        return code
    running = {name: start() for name, start in helpers.items()}
    if reporter is not None:
        running["lb report"] = reporter.run(stop)
    return await run_alongside(follower.run(stop), stop, running)
