"""The HTTP client behind cpctl: any agent will do, and every call has a timeout.

During an outage some agents are gone, so a call goes to the first endpoint that
answers and then sticks to it (a plan, its commit and the wait for the revision that
carries it all go to the same agent while it answers). An endpoint that cannot be
reached (connection refused, DNS failure, connect timeout) is skipped for the next.

Reads are safe to repeat, so a read whose answer does not come (reset, read timeout)
or that an agent cannot serve (503: no decision yet, overloaded) is also retried on
the next endpoint. An agent that has lost quorum still answers reads, with the last
committed decision marked stale: cpctl then asks the other endpoints for a fresh one,
and shows the stale answer (marked) only when no agent has better. A new intent carries
an id chosen here, so it is resent elsewhere like a read (the same id commits once).
Other writes (removing an intent) are retried elsewhere only when they never left this
machine: once sent they may have been committed, so cpctl says so and stops instead.

`https://` endpoints are verified with `ssl_context` (cpctl's --ca-file, --cert-file and
--key-file build it with `controlplane.client.tls.client_context`), else with the
system's CAs. A certificate the client cannot verify, or a handshake the agent refuses
(mutual TLS without an acceptable client certificate), means the request was never
served: the next endpoint is tried, and when none works the error says what to give.

A hung agent (it accepts the connection and never answers) must not hold an operator
for the whole --timeout while others could answer: every attempt but the last one
gives a read a short time to connect and send its first byte (`FIRST_BYTE_S`), then
cpctl moves on and says so once on stderr. --timeout bounds the whole answer of every
request, not each read from the socket, so an agent that trickles a byte at a time
cannot hold cpctl past it either. A successful answer that is not what an agent gives
for that route (`shapes`) counts as a failure of that agent, never as an empty result.

Blocking stdlib `http.client`, not aiohttp: a CLI makes a handful of calls one after
the other, and importing less makes every invocation start faster.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.cpctl import shapes
from controlplane.cpctl.errors import Refused, Unreachable, UsageProblem
from controlplane.errors import ControlplaneError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

CONNECT_TIMEOUT_MAX_S = 3.0
# Connect and first byte, on every attempt but the last, for reads that do not block.
FIRST_BYTE_S = 2.0
STALE_HEADER = "X-Controlplane-Stale"
USER_AGENT = "cpctl/0.1"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: Any
    endpoint: str

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


def normalize_endpoint(text: str) -> str:
    """`host:port` or `http(s)://host:port`, without a trailing slash; `UsageProblem` if neither."""
    raw = text.strip().rstrip("/")
    if not raw:
        raise UsageProblem("an empty endpoint was given")
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urllib.parse.urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        raise UsageProblem(f"bad endpoint {text!r}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise UsageProblem(f"bad endpoint {text!r}: expected host:port or http://host:port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


class _NotSent(ControlplaneError):
    """The request never reached the agent; trying another endpoint is always safe."""


class _NoAnswer(ControlplaneError):
    """The request was sent but no (whole) answer came back."""


class _Late(TimeoutError):
    """A deadline passed while reading the answer (its text says which one)."""


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, read by a deadline for the first byte and one for the whole answer.

    A socket timeout bounds each read only; checking the clock before every read bounds
    the sum, whatever the server trickles.

    `holder` is the file `HTTPResponse` opened on the socket: it holds the socket open
    (`socket.makefile` counts its files) after the connection lets go of it, which it
    does when the server will close (HTTP/1.0); it is closed with this reader.
    """

    def __init__(
        self,
        sock: socket.socket,
        holder: io.IOBase,
        first_byte_by: float,
        answer_by: float,
        late: tuple[str, str],
    ) -> None:
        super().__init__()
        self._sock = sock
        self._holder = holder
        self._first_byte_by = first_byte_by
        self._answer_by = answer_by
        self._late_texts = late  # (no first byte, not whole)
        self._started = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._holder.close()
        super().close()

    def readinto(self, buffer: WriteableBuffer) -> int:
        by = self._answer_by if self._started else self._first_byte_by
        remaining = by - time.monotonic()
        if remaining <= 0:
            raise self._late()
        self._sock.settimeout(remaining)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            raise self._late() from None
        self._started = self._started or n > 0
        return n

    def _late(self) -> _Late:
        return _Late(self._late_texts[int(self._started)])


def _timed_response(
    first_byte_by: float, answer_by: float, late: tuple[str, str]
) -> type[http.client.HTTPResponse]:
    """An `HTTPResponse` class that reads through a `_DeadlineReader` (headers included)."""

    class TimedResponse(http.client.HTTPResponse):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            reader = _DeadlineReader(sock, self.fp, first_byte_by, answer_by, late)
            self.fp = io.BufferedReader(reader)

    return TimedResponse


@dataclass
class Client:
    """Calls the agents' HTTP API; see the module docstring for the failover rules."""

    endpoints: Sequence[str]
    token: str | None = None
    user: str | None = None
    timeout_s: float = 10.0
    # For https endpoints; None: the system's CAs, no client certificate.
    ssl_context: ssl.SSLContext | None = None
    # Told, once, when an endpoint is passed over for the next (default: a line on stderr).
    notice: Callable[[str], None] | None = None
    _current: int = field(default=0, init=False)
    _noticed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise UsageProblem("no endpoint given (use --endpoint or CPCTL_ENDPOINT)")

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to first (the last one that answered)."""
        return self.endpoints[self._current]

    def get(
        self, path: str, query: Mapping[str, str] | None = None, *, timeout_s: float | None = None
    ) -> Response:
        return self.call("GET", path, query=query, timeout_s=timeout_s)

    def post(self, path: str, body: Any, *, idempotent: bool = False) -> Response:
        """`idempotent`: the POST changes nothing (a plan), so it may be sent again elsewhere."""
        return self.call("POST", path, body=body, idempotent=idempotent)

    def delete(self, path: str, query: Mapping[str, str] | None = None) -> Response:
        return self.call("DELETE", path, query=query)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
        idempotent: bool | None = None,
        first_byte_s: float | None = None,
    ) -> Response:
        """One API call; the parsed JSON answer, or `Refused` / `Unreachable`.

        `first_byte_s`: how long an attempt that is not the last may wait to connect and
        for the first byte (default `FIRST_BYTE_S` for a GET that does not block, else
        the whole timeout: a write's answer waits for its commit).
        """
        target = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        if idempotent is None:
            idempotent = method == "GET"
        if first_byte_s is None and method == "GET" and "wait" not in (query or {}):
            first_byte_s = FIRST_BYTE_S
        failures: list[str] = []
        passed_over: tuple[str, str] | None = None
        junk = False
        last_unavailable: Refused | None = None
        stale: tuple[int, Response] | None = None
        n = len(self.endpoints)
        for step in range(n):
            index = (self._current + step) % n
            endpoint = self.endpoints[index]
            last = step == n - 1
            try:
                status, headers, raw = self._send(
                    endpoint,
                    method,
                    target,
                    payload,
                    timeout_s or self.timeout_s,
                    None if last else first_byte_s,
                )
            except _NotSent as e:
                failures.append(f"{endpoint}: {e}")
                passed_over = passed_over or (endpoint, f"not answering ({e})")
                continue
            except _NoAnswer as e:
                if idempotent:
                    failures.append(f"{endpoint}: {e}")
                    passed_over = passed_over or (endpoint, f"not answering ({e})")
                    continue
                raise Unreachable(
                    f"{method} {path} was sent to {endpoint} but no answer came ({e}); it may or may not "
                    "have been committed: check `cpctl intents` and `cpctl history` before trying again"
                ) from None
            response = Response(status, headers, _parse(raw), endpoint)
            if status < 400:
                bad = shapes.problem(method, path, response.body)
                if bad is not None:
                    # Not an agent's answer: a proxy's page, a wrong port. Never shown as data.
                    if not idempotent:
                        raise Unreachable(
                            f"{endpoint} is not answering as an agent to {method} {path}: {bad}"
                        )
                    junk = True
                    failures.append(f"{endpoint} answered {method} {path} {status}, not as an agent: {bad}")
                    passed_over = passed_over or (endpoint, f"not answering as an agent ({bad})")
                    continue
                if idempotent and response.header(STALE_HEADER) is not None and step < n - 1:
                    stale = stale or (index, response)
                    continue
                self._current = index
                self._tell(passed_over, endpoint)
                return response
            self._current = index
            refused = _refusal(response)
            if status == 401 and not self.token:
                refused.message += "; cpctl sent no token: set CPCTL_TOKEN or use --token-file"
            if idempotent and status in (502, 503, 504) and step < n - 1:
                last_unavailable = refused
                failures.append(f"{endpoint}: {status} {refused.error}")
                continue
            raise refused
        if stale is not None:
            self._current = stale[0]
            self._tell(passed_over, stale[1].endpoint)
            return stale[1]
        if last_unavailable is not None:
            raise last_unavailable
        if junk:
            raise Unreachable("no agent gave a usable answer: " + _grouped(failures))
        raise Unreachable("no agent reachable: " + _grouped(failures))

    def _tell(self, passed_over: tuple[str, str] | None, using: str) -> None:
        """Say once per run that an endpoint was passed over, and for which."""
        if passed_over is None or self._noticed:
            return
        self._noticed = True
        line = f"agent {passed_over[0]} {passed_over[1]}, using {using}"
        if self.notice is not None:
            self.notice(line)
        else:
            sys.stderr.write(f"cpctl: {line}\n")
            sys.stderr.flush()

    def get_from(
        self, endpoint: str, path: str, query: Mapping[str, str] | None, timeout_s: float
    ) -> Response:
        """One GET to one given endpoint, whatever its status; `Unreachable` when no answer came."""
        target = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        try:
            status, headers, raw = self._send(endpoint, "GET", target, None, timeout_s)
        except (_NotSent, _NoAnswer) as e:
            raise Unreachable(f"{endpoint}: {e.message}") from None
        return Response(status, headers, _parse(raw), endpoint)

    def _send(
        self,
        endpoint: str,
        method: str,
        target: str,
        payload: bytes | None,
        timeout_s: float,
        first_byte_s: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request: connected and first byte within `first_byte_s` (when given), all of
        the answer within `timeout_s` of the start."""
        parts = urllib.parse.urlsplit(endpoint)
        host = parts.hostname or ""
        started = time.monotonic()
        answer_by = started + timeout_s
        first_s = timeout_s if first_byte_s is None else min(first_byte_s, timeout_s)
        connect_timeout = min(CONNECT_TIMEOUT_MAX_S, first_s)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            context = self.ssl_context or ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, parts.port, timeout=connect_timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=connect_timeout)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.user:
            headers["X-Controlplane-User"] = self.user
        if payload is not None:
            headers["Content-Type"] = "application/json"
        late = (f"no answer within {first_s:g} s", f"answer not complete within {timeout_s:g} s")
        conn.response_class = _timed_response(started + first_s, answer_by, late)
        try:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as e:
                raise _NotSent(_describe(e, "connect", connect_timeout)) from None
            if conn.sock is not None:
                conn.sock.settimeout(max(0.001, answer_by - time.monotonic()))
            try:
                conn.request(method, target, body=payload, headers=headers)
                answer = conn.getresponse()
                raw = answer.read()
            except ssl.SSLError as e:
                if _refused_certificate(e):
                    # With TLS 1.3 the agent checks the client's certificate after the
                    # client thinks the handshake is done: it refused the connection
                    # before reading the request, so nothing was served.
                    raise _NotSent(_describe(e, "answer", timeout_s)) from None
                raise _NoAnswer(_describe(e, "answer", timeout_s)) from None
            except (http.client.RemoteDisconnected, ConnectionResetError) as e:
                reason = _describe(e, "answer", timeout_s)
                if parts.scheme == "https":
                    # With TLS 1.3 an agent that requires client certificates checks
                    # ours after our side of the handshake ended, and hangs up.
                    reason += f"; {_CLIENT_CERT_HINT}"
                raise _NoAnswer(reason) from None
            except (OSError, http.client.HTTPException) as e:
                raise _NoAnswer(_describe(e, "answer", timeout_s)) from None
            return answer.status, dict(answer.getheaders()), raw
        finally:
            conn.close()


def _grouped(failures: Sequence[str]) -> str:
    """`a: why; b: why` with endpoints that failed alike named together (`a, b: why`)."""
    by_reason: dict[str, list[str]] = {}
    for failure in failures:
        endpoint, _, reason = failure.partition(": ")
        by_reason.setdefault(reason, []).append(endpoint)
    return "; ".join(f"{', '.join(endpoints)}: {reason}" for reason, endpoints in by_reason.items())


def _describe(e: BaseException, phase: str, timeout_s: float) -> str:
    if isinstance(e, _Late):
        return str(e)
    if isinstance(e, TimeoutError | socket.timeout):
        return f"no {phase} within {timeout_s:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host ({e.strerror or e})"
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"TLS: cannot verify the agent's certificate ({e.verify_message or e.reason}); "
            "trust its CA with --ca-file or CPCTL_CA_FILE"
        )
    if isinstance(e, ssl.SSLError) and _refused_certificate(e):
        return f"TLS: the agent refused the connection ({e.reason}): {_CLIENT_CERT_HINT}"
    if isinstance(e, ssl.SSLError):
        return f"TLS error ({e.reason or e})"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text)


_CLIENT_CERT_HINT = (
    "if the agents require a client certificate (mutual TLS), give one signed by their CA with "
    "--cert-file and --key-file (CPCTL_CERT_FILE, CPCTL_KEY_FILE)"
)

# TLS alerts an agent sends when it refuses a client's certificate (or its absence).
_CERTIFICATE_ALERTS = (
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
)


def _refused_certificate(e: ssl.SSLError) -> bool:
    return e.reason in _CERTIFICATE_ALERTS


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def _refusal(response: Response) -> Refused:
    body = response.body
    if isinstance(body, dict) and "error" in body:
        return Refused(
            response.status,
            str(body.get("error")),
            str(body.get("detail") or ""),
            response.endpoint,
            str(body.get("code") or ""),
        )
    text = body if isinstance(body, str) else json.dumps(body)
    return Refused(response.status, f"HTTP {response.status}", text.strip()[:300], response.endpoint)
