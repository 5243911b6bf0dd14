"""Single HTTP and TCP probes, each bounded in time and in memory.

A probe never raises for anything the network or the target does: every failure comes
back as a `ProbeResult` with a short error an operator can read in a reason string
("connect refused", "connect timeout", "timeout after 500 ms", "HTTP 503", "bad JSON").
Each probe is bounded by `target.timeout_s` (plus a few milliseconds of slack for HTTP,
see `_CAP_SLACK_S`), connecting, the response and the body together; the body is read
up to `MAX_BODY_BYTES` and no further.

HTTP probes send `Connection: close` so that every probe opens a fresh connection: a
kept-alive connection would keep succeeding after the target stopped accepting new ones,
which is exactly the failure a health check is for.
"""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp
import orjson

from controlplane.errors import ProbeError
from controlplane.probes.target import ProbeResult, ProbeTarget

MAX_BODY_BYTES = 64 * 1024

# aiohttp times the connect and each read against the probe timeout, which tells a
# connect that hangs from a response that never comes. A connect plus a read could take
# twice the timeout, so an outer deadline caps the whole probe; it is set a little later
# so that it does not pre-empt aiohttp's connect timer and blur "connect timeout".
_CAP_SLACK_S = 0.05

_HEADERS = {"Connection": "close", "User-Agent": "controlplane-probe/1", "Accept": "*/*"}


class _BadBody(ProbeError):
    """The target answered with an acceptable status but a body we cannot use."""


async def check(session: aiohttp.ClientSession, target: ProbeTarget) -> ProbeResult:
    """Probe `target` once with the probe its kind calls for."""
    if target.kind == "http":
        return await check_http(session, target)
    return await check_tcp(target)


async def check_http(session: aiohttp.ClientSession, target: ProbeTarget) -> ProbeResult:
    """GET `target.url`; ok when the status is expected and any JSON body is usable."""
    started = time.monotonic()
    status: int | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=target.timeout_s, sock_read=target.timeout_s)

    def failed(error: str) -> ProbeResult:
        return ProbeResult(False, time.monotonic() - started, error, status=status)

    try:
        async with (
            asyncio.timeout(target.timeout_s + _CAP_SLACK_S),
            session.get(
                str(target.url), timeout=timeout, allow_redirects=False, headers=_HEADERS
            ) as response,
        ):
            status = response.status
            if status not in target.expect_status:
                return failed(f"HTTP {status}")
            utilization = None
            if _is_json(response.content_type):
                body = await read_bounded(response.content, MAX_BODY_BYTES)
                if body is None:
                    raise _BadBody(f"body over {MAX_BODY_BYTES // 1024} KiB")
                utilization = _utilization_of(body)
    except _BadBody as exc:
        return failed(str(exc))
    except aiohttp.ConnectionTimeoutError:
        return failed("connect timeout")
    except TimeoutError:
        return failed(f"timeout after {round(target.timeout_s * 1000)} ms")
    except aiohttp.ClientSSLError:
        return failed("TLS handshake failed")
    except aiohttp.ClientConnectorDNSError:
        return failed("DNS lookup failed")
    except aiohttp.ClientConnectorError as exc:
        return failed(_connect_error(exc.os_error))
    except aiohttp.ServerDisconnectedError:
        return failed("server disconnected")
    except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError):
        return failed("bad response")
    except aiohttp.ClientError as exc:
        return failed(f"client error: {type(exc).__name__}")
    except OSError as exc:
        return failed(_connect_error(exc))
    return ProbeResult(True, time.monotonic() - started, status=status, utilization=utilization)


async def check_tcp(target: ProbeTarget) -> ProbeResult:
    """Open a TCP connection to `target.host:target.port` and close it again."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(target.timeout_s):
            _, writer = await asyncio.open_connection(target.host, target.port)
    except TimeoutError:
        return ProbeResult(False, time.monotonic() - started, "connect timeout")
    except OSError as exc:
        return ProbeResult(False, time.monotonic() - started, _connect_error(exc))
    elapsed = time.monotonic() - started
    writer.close()
    # Closing needs nothing from the peer, but the wait is bounded all the same.
    try:
        async with asyncio.timeout(target.timeout_s):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass
    return ProbeResult(True, elapsed)


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    return f"connect failed: {exc.strerror or type(exc).__name__}"


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over `limit` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _utilization_of(body: bytes) -> float | None:
    """`utilization` from a JSON object body, clamped to 0..1; None when absent."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _BadBody("bad JSON") from None
    if not isinstance(data, dict) or data.get("utilization") is None:
        return None
    value = data["utilization"]
    # bool is an int in Python; `true` is not a utilization.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadBody("bad utilization")
    # Above 1 means saturated; the model's scale stops there.
    return min(max(float(value), 0.0), 1.0)
