"""What a host, a `host:port` and a target URL may look like, strictly.

Addresses from the configuration end up verbatim in other programs' configuration (an
nginx `server` line, HAProxy commands, an Envoy endpoint): a value such as
`1.2.3.4:80 weight=1; } server { listen 6666; }` must never get that far. A host is a
DNS name (letters, digits, `-` and `_` in dot-separated labels of at most 63
characters, 253 in all), an IPv4 address, or an IPv6 address in brackets; a port is
1 to 65535 in ASCII digits. Nothing else: no spaces, `;`, braces, quotes or controls.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>[/?#].*)?$", re.DOTALL)
_UNSAFE_IN_PATH = re.compile(r"[\s\x00-\x1f\x7f-\x9f\"'<>\\{}|^`]")


def host_problem(host: str) -> str | None:
    """Why `host` is not a host name or address (None when it is one)."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address in brackets"
        return None
    if not host:
        return "the host is empty"
    if len(host) > 253:
        return "the host name is longer than 253 characters"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address"
        return None
    if not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return "not a host name (letters, digits, - and _ in dot-separated labels) or an IP address"
    return None


def split_host_port(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into (host, port), IPv6 without brackets; `ValueError` naming why.

    With `default_port`, a bare host is accepted and gets that port.
    """
    if value.startswith("["):
        end = value.find("]") + 1
        host, rest = (value[:end], value[end:]) if end else (value, "")
    else:
        colon = value.find(":")
        host, rest = (value, "") if colon < 0 else (value[:colon], value[colon:])
    if not rest and default_port is not None:
        port = str(default_port)
    elif rest.startswith(":"):
        port = rest[1:]
    else:
        raise ValueError("must be host:port (an IPv6 host in brackets)")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError("must be host:port with a port between 1 and 65535")
    problem = host_problem(host)
    if problem:
        raise ValueError(f"must be host:port: {problem}")
    return (host[1:-1] if host.startswith("[") else host), int(port)


def url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """Why `url` is not `scheme://host[:port][/path]` with a strict host (None when it is)."""
    match = _URL.match(url)
    if match is None or match["scheme"] not in schemes:
        return f"must be {' or '.join(f'{s}://host:port' for s in schemes)}"
    authority = match["authority"]
    if "@" in authority:
        return "must not carry a user name or password"
    default = 443 if match["scheme"] == "https" else 80
    try:
        split_host_port(authority, default_port=default)
    except ValueError as e:
        return str(e).replace("host:port", "scheme://host:port", 1)
    rest = match["rest"] or ""
    if _UNSAFE_IN_PATH.search(rest):
        return "the path must not contain spaces, quotes, braces or control characters"
    return None
