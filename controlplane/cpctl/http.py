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

Blocking stdlib `http.client`, not aiohttp: a CLI makes a handful of calls one after
the other, and importing less makes every invocation start faster.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.cpctl.errors import Refused, Unreachable, UsageProblem
from controlplane.errors import ControlplaneError

CONNECT_TIMEOUT_MAX_S = 3.0
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


@dataclass
class Client:
    """Calls the agents' HTTP API; see the module docstring for the failover rules."""

    endpoints: Sequence[str]
    token: str | None = None
    user: str | None = None
    timeout_s: float = 10.0
    # For https endpoints; None: the system's CAs, no client certificate.
    ssl_context: ssl.SSLContext | None = None
    _current: int = field(default=0, init=False)

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
    ) -> Response:
        """One API call; the parsed JSON answer, or `Refused` / `Unreachable`."""
        target = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        if idempotent is None:
            idempotent = method == "GET"
        failures: list[str] = []
        last_unavailable: Refused | None = None
        stale: tuple[int, Response] | None = None
        n = len(self.endpoints)
        for step in range(n):
            index = (self._current + step) % n
            endpoint = self.endpoints[index]
            try:
                status, headers, raw = self._send(
                    endpoint, method, target, payload, timeout_s or self.timeout_s
                )
            except _NotSent as e:
                failures.append(f"{endpoint}: {e}")
                continue
            except _NoAnswer as e:
                if idempotent:
                    failures.append(f"{endpoint}: {e}")
                    continue
                raise Unreachable(
                    f"{method} {path} was sent to {endpoint} but no answer came ({e}); it may or may not "
                    "have been committed: check `cpctl intents` and `cpctl history` before trying again"
                ) from None
            response = Response(status, headers, _parse(raw), endpoint)
            if status < 400:
                if idempotent and response.header(STALE_HEADER) is not None and step < n - 1:
                    stale = stale or (index, response)
                    continue
                self._current = index
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
            return stale[1]
        if last_unavailable is not None:
            raise last_unavailable
        raise Unreachable("no agent reachable: " + _grouped(failures))

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
        self, endpoint: str, method: str, target: str, payload: bytes | None, timeout_s: float
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(endpoint)
        host = parts.hostname or ""
        connect_timeout = min(CONNECT_TIMEOUT_MAX_S, timeout_s)
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
        try:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as e:
                raise _NotSent(_describe(e, "connect", connect_timeout)) from None
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)
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
