"""The HTTP server's own defences: timeouts against slow clients, a cap on connections.

A hostile or broken client must not be able to hold the agent's sockets: every
connection has to deliver a whole request head within `api.header_timeout_s` (from
connect, and again after each response on a kept-alive connection), or it is closed;
a request body has to arrive within `api.body_timeout_s`. Past `max_connections` open
connections, a new one is answered 503 and closed at once, before anything is parsed.

The cap sits below the process's file-descriptor limit (`RLIMIT_NOFILE`), checked at
start: the soft limit is raised towards the hard one when that is needed, and
`FD_RESERVE` descriptors plus one per probe stay free for the store, Raft peers, probes
and logs. Blocking queries and event streams (`api.max_watchers`) live inside the cap,
with `WRITE_HEADROOM` connections left for writes and health checks.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from controlplane.config import Settings
from controlplane.errors import ConfigError

log = logging.getLogger(__name__)

FD_RESERVE = 128
WRITE_HEADROOM = 16
DEFAULT_MAX_CONNECTIONS = 25_000

_OVERLOADED_BODY = (
    b'{"error": "too many connections", "detail": "this agent holds its limit; retry or use another"}'
)
OVERLOADED_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_OVERLOADED_BODY), _OVERLOADED_BODY)
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    max_watchers: int
    nofile: int  # the soft RLIMIT_NOFILE in force after start


def connection_limits(settings: Settings, *, raise_soft_limit: bool = True) -> ConnectionLimits:
    """The connection and watcher caps this process can honour; `ConfigError` when not.

    An explicit `api.max_connections` that does not fit under the descriptor limit is
    refused; without one, the cap is `DEFAULT_MAX_CONNECTIONS` or what fits.
    """
    api = settings.model.api
    reserve = FD_RESERVE + settings.model.probes.max_concurrency + 4 * len(settings.cluster.agents)
    wanted = (api.max_connections or DEFAULT_MAX_CONNECTIONS) + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft_limit and soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, new_soft, e)
    available = (wanted if soft == resource.RLIM_INFINITY else soft) - reserve
    problems = []
    if api.max_connections is not None and api.max_connections > available:
        problems.append(
            f"api.max_connections: more than this process can open: the open-file limit (ulimit -n) is "
            f"{soft}, of which {reserve} are kept for the store, peers and probes; raise LimitNOFILE or "
            f"lower it (got {api.max_connections})"
        )
    max_connections = min(api.max_connections or DEFAULT_MAX_CONNECTIONS, available)
    if max_connections <= WRITE_HEADROOM:
        problems.append(
            f"api.max_connections: the open-file limit (ulimit -n) {soft} leaves room for only "
            f"{max(available, 0)} connections; raise it (got {api.max_connections or 'the default'})"
        )
    watchers_room = max_connections - WRITE_HEADROOM
    explicit_watchers = "max_watchers" in api.model_fields_set
    if explicit_watchers and api.max_watchers > watchers_room:
        problems.append(
            f"api.max_watchers: must leave {WRITE_HEADROOM} of the {max_connections} connections this "
            f"agent may hold for writes and health checks (got {api.max_watchers})"
        )
    if problems:
        raise ConfigError(problems)
    return ConnectionLimits(max_connections, min(api.max_watchers, watchers_room), int(soft))


class GuardedSite(web.TCPSite):
    """A `TCPSite` that answers 503 and closes connections past `max_connections`.

    With `ssl_context`, HTTPS: a client has `handshake_timeout_s` to finish the TLS
    handshake, and a connection refused for the cap is refused after it (over TLS).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True, backlog=1024, ssl_context=ssl_context)
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                return _Refuse()
            return server()

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self.handshake_timeout_s if self._ssl_context is not None else None,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they write all the same.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(OVERLOADED_ANSWER)
        writer.close()
