"""Config cannot inject: hosts and ports are checked strictly, and renderers refuse the rest.

An `address` of `1.2.3.4:80 weight=1; } server { listen 6666; }` once passed
check-config and was written verbatim into the nginx configuration.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.addresses import host_problem, split_host_port, url_problem
from controlplane.config import parse_settings
from controlplane.errors import ConfigError, Rejected
from controlplane.formats import envoy_cla, nginx_upstream
from controlplane.lb.mapfile import load_nginx_map
from controlplane.testing.localcluster import load_demo_config

INJECTIONS = [
    "1.2.3.4:80 weight=1; } server { listen 6666; } upstream x { server 5.6.7.8:80",
    "1.2.3.4;:80",
    "evil{}:80",
    "a b:80",
    "host\n:80",
    "host:80\n",
    "host:80;",
    "'host':80",
    "999.1.2.3:80",
    "[not-v6]:80",
    "::1:80",
    "host:0",
    "host:65536",
    "host:８０",
]
GOOD = ["127.0.0.1:80", "[::1]:8080", "order.cn-east.svc.cluster.local:443", "a_b-c:1", "[fd00::3]:65535"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_what_is_not_host_port_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="must be host:port"):
        split_host_port(value)


@pytest.mark.parametrize("value", GOOD)
def test_hosts_and_ports_are_accepted(value: str) -> None:
    host, port = split_host_port(value)
    assert 0 < port < 65536 and host_problem(host if ":" not in host else f"[{host}]") is None


@pytest.mark.parametrize(
    "url",
    [
        "http://1.2.3.4:80;}/healthz",
        "http://evil host/healthz",
        "http://h/x y",
        "http://h/{x}",
        "http://h/x\nserver",
        "http://user:pw@h/",
        "ftp://h/",
    ],
)
def test_urls_with_bad_hosts_or_paths_are_refused(url: str) -> None:
    assert url_problem(url, ("http", "https")) is not None


def config_with(path: list[Any], value: Any) -> dict[str, Any]:
    config = load_demo_config()
    where = config
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return config


SERVICE = ["regions", "cn-east", "services", "order"]


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ([*SERVICE, "address"], INJECTIONS[0], "regions.cn-east.services.order.address: must be host:port"),
        (
            [*SERVICE, "targets"],
            ["http://1.2.3.4:80;}/healthz"],
            "regions.cn-east.services.order.targets[0].url: must be scheme://host:port",
        ),
        (
            [*SERVICE, "targets"],
            ["http://127.0.0.1:9101/x y"],
            "regions.cn-east.services.order.targets[0].url: the path must not contain spaces",
        ),
        (
            [*SERVICE, "targets"],
            ["tcp://a;b:80"],
            "regions.cn-east.services.order.targets[0].url: must be host:port",
        ),
        (["cluster", "agents", 0, "http"], "127.0.0.1:8701 ", "cluster.agents[0].http: must be host:port"),
        (["cluster", "agents", 0, "raft"], "x{}:7701", "cluster.agents[0].raft: must be host:port"),
    ],
)
def test_the_config_refuses_injections_with_the_path(path: list[Any], value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(config_with(path, value))
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_check_config_exits_2_on_the_nginx_injection(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_with([*SERVICE, "address"], INJECTIONS[0])))
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "check-config", "--no-secrets", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "regions.cn-east.services.order.address: must be host:port" in done.stderr


DECISION = {
    "revision": 4,
    "term": 1,
    "committed_at": "2026-11-27T10:00:00.123Z",
    "leader": "a",
    "panic": False,
    "frozen": False,
    "shed_fraction": 0.0,
    "services": {
        "order": {
            "cn-east": {"weight": 60, "state": "healthy"},
            "cn-south": {"weight": 40, "state": "healthy"},
        }
    },
    "features": {},
    "reasons": [],
}


@pytest.mark.parametrize("bad", INJECTIONS[:6])
def test_the_renderers_refuse_what_is_not_a_host(bad: str) -> None:
    addresses = {"cn-east": "10.0.0.1:80", "cn-south": bad}
    with pytest.raises(Rejected):
        nginx_upstream(DECISION, "order", addresses)
    with pytest.raises(Rejected):
        envoy_cla(DECISION, "order", addresses)


def test_the_nginx_map_refuses_an_injected_server(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump({"order": {"servers": {"cn-east": INJECTIONS[0]}}}))
    with pytest.raises(ConfigError) as refused:
        load_nginx_map(path)
    assert any("order.servers.cn-east: must be host:port" in p for p in refused.value.problems)
