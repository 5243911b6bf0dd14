"""The map files that tell an adapter where each region of each service lives.

HAProxy (`controlplane lb haproxy --map`)::

    order:
      backend: be_order
      servers: {cn-east: east, cn-south: south, cn-north: north}

nginx (`controlplane lb nginx --map`)::

    order:
      upstream: order            # optional, default: the service name
      server_params: max_fails=0 # optional, added to every server line
      servers: {cn-east: "10.1.0.10:8080", cn-south: "10.2.0.10:8080"}

Like the agent's configuration, a bad file is refused with every problem listed as
`path: what is wrong (got value)`, and nothing starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import ConfigError, Rejected
from controlplane.formats import ServerMap, split_address

# HAProxy proxy and server names, nginx upstream names: no spaces, slashes or quotes.
_LB_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_NGINX_PARAMS = re.compile(r"^[A-Za-z0-9_=.: -]*$")


@dataclass(frozen=True, slots=True)
class NginxUpstream:
    service: str
    upstream: str
    addresses: Mapping[str, str]  # region -> host:port
    server_params: str = ""


def read_yaml_mapping(path: Path) -> Mapping[str, Any]:
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError([f"--map {path}: cannot read ({e.strerror})"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from e
    if not isinstance(data, Mapping) or not data:
        raise ConfigError([f"{path}: must map services to their settings (got {data!r:.60})"])
    return data


def _select(data: Mapping[str, Any], services: Sequence[str], problems: list[str]) -> list[str]:
    for s in services:
        if s not in data:
            problems.append(f"--service {s}: not in the map file (known: {', '.join(map(str, data))})")
    return [str(s) for s in data if not services or s in services]


def _servers(path: str, value: Any, problems: list[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not value:
        problems.append(f"{path}: must map regions to servers (got {value!r:.60})")
        return {}
    return value


def _name(path: str, value: Any, problems: list[str]) -> str:
    if not isinstance(value, str) or not _LB_NAME.match(value):
        problems.append(f"{path}: must be a name without spaces, slashes or quotes (got {value!r:.60})")
        return ""
    return value


def _unknown_keys(path: str, entry: Mapping[str, Any], allowed: set[str], problems: list[str]) -> None:
    for key in entry:
        if key not in allowed:
            problems.append(f"{path}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def load_haproxy_map(path: Path, services: Sequence[str] = ()) -> dict[str, ServerMap]:
    """service -> region -> (backend, server), for the selected services (all by default)."""
    data = read_yaml_mapping(path)
    problems: list[str] = []
    out: dict[str, ServerMap] = {}
    owner: dict[str, str] = {}
    for service in _select(data, services, problems):
        entry = data[service]
        if not isinstance(entry, Mapping):
            problems.append(f"{service}: must have backend and servers (got {entry!r:.60})")
            continue
        _unknown_keys(service, entry, {"backend", "servers"}, problems)
        backend = _name(f"{service}.backend", entry.get("backend"), problems)
        if backend and backend in owner:
            problems.append(f"{service}.backend: already used by service {owner[backend]} (got {backend!r})")
        owner.setdefault(backend, service)
        servers: dict[str, tuple[str, str]] = {}
        for region, server in _servers(f"{service}.servers", entry.get("servers"), problems).items():
            name = _name(f"{service}.servers.{region}", server, problems)
            servers[str(region)] = (backend, name)
        out[service] = servers
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return out


def load_nginx_map(path: Path, services: Sequence[str] = ()) -> dict[str, NginxUpstream]:
    """service -> its upstream name, region addresses and server parameters."""
    data = read_yaml_mapping(path)
    problems: list[str] = []
    out: dict[str, NginxUpstream] = {}
    for service in _select(data, services, problems):
        entry = data[service]
        if not isinstance(entry, Mapping):
            problems.append(f"{service}: must have servers (got {entry!r:.60})")
            continue
        _unknown_keys(service, entry, {"upstream", "servers", "server_params"}, problems)
        upstream = _name(f"{service}.upstream", entry.get("upstream", service), problems)
        params = entry.get("server_params", "")
        if not isinstance(params, str) or not _NGINX_PARAMS.match(params) or " down" in f" {params}":
            problems.append(
                f"{service}.server_params: must be nginx server parameters such as max_fails=0, "
                f"without down (got {params!r:.60})"
            )
        addresses: dict[str, str] = {}
        for region, address in _servers(f"{service}.servers", entry.get("servers"), problems).items():
            try:
                split_address(str(address))
            except Rejected:
                problems.append(f"{service}.servers.{region}: must be host:port (got {address!r:.60})")
            addresses[str(region)] = str(address)
        out[service] = NginxUpstream(service, upstream, addresses, params if isinstance(params, str) else "")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return out
