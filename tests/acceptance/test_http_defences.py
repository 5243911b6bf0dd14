"""Given a real agent, when clients attack its HTTP port, then it keeps its sockets.

Slowloris (request heads sent a byte at a time and never finished), idle connections,
bodies that trickle in, more connections than the agent may hold, and a connection cap
that the process's open-file limit cannot honour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.testing.localcluster import LocalCluster
from tests.acceptance.conftest import StartCluster, fast_config

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

HEADER_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 400


def solo_config(**api: Any) -> dict[str, Any]:
    config = fast_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    config["api"] = {**config.get("api", {}), **api}
    return config


def address(cluster: LocalCluster) -> tuple[str, int]:
    host, port = next(iter(cluster.agents.values())).http.rsplit(":", 1)
    return host, int(port)


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    """What the agent sent before closing, or None when it was still open after `timeout_s`."""
    received = b""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return None
        except ConnectionError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


async def healthz(cluster: LocalCluster) -> int:
    host, port = address(cluster)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(answer.split(b" ", 2)[1])


async def test_half_sent_and_idle_connections_are_closed_within_the_header_timeout(
    cluster: StartCluster,
) -> None:
    c = await cluster(
        solo_config(header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=HEADER_TIMEOUT_S, max_connections=400)
    )
    host, port = address(c)
    opened = []
    for i in range(300):
        reader, writer = await asyncio.open_connection(host, port)
        if i % 2:  # slowloris: a request head that is never finished
            writer.write(b"GET /v1/decision HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        opened.append((reader, writer))
    # Keep trickling bytes into the half-sent heads: data must not keep them alive.
    for _ in range(3):
        await asyncio.sleep(0.5)
        for i, (_, writer) in enumerate(opened):
            if i % 2 and not writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    writer.write(b"a")
    assert await healthz(c) == 200  # the agent still serves while they hang on
    results = await asyncio.gather(*(closed_within(r, HEADER_TIMEOUT_S + 10) for r, _ in opened))
    still_open = [i for i, got in enumerate(results) if got is None]
    assert not still_open, f"{len(still_open)} of 300 connections still open, e.g. {still_open[:5]}"
    for _, writer in opened:
        writer.close()

    # A body that trickles in is refused once its time is up.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/plan HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    answer = await closed_within(reader, HEADER_TIMEOUT_S + 10)
    writer.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 400"), answer
    assert b"body too slow" in answer


async def test_connections_past_the_cap_get_503_and_the_agent_still_serves(cluster: StartCluster) -> None:
    c = await cluster(solo_config(header_timeout_s=30, max_connections=64, max_watchers=40))
    host, port = address(c)
    held = [await asyncio.open_connection(host, port) for _ in range(64)]
    await asyncio.sleep(0.3)
    reader, writer = await asyncio.open_connection(host, port)
    answer = await closed_within(reader, 10)
    writer.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
    assert b"too many connections" in answer
    for _, w in held:
        w.close()
    await asyncio.sleep(0.5)
    assert await healthz(c) == 200


def run_agent(tmp_path: Path, config: dict[str, Any], nofile: int) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.yaml"
    config = {**config, "data_dir": str(tmp_path / "data")}
    path.write_text(yaml.safe_dump(config))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = {
        **os.environ,
        "CONTROLPLANE_CLUSTER_SECRET": "cluster-secret-0123456789",
        "CONTROLPLANE_ADMIN_TOKEN": "admin-token-0123456789",
    }
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "agent", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        preexec_fn=limit,
        check=False,
    )


def test_a_connection_cap_above_the_open_file_limit_is_refused_at_start(tmp_path: Path) -> None:
    config = solo_config(max_connections=5000)
    done = run_agent(tmp_path, config, nofile=1024)
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(
        line.strip().startswith("api.max_connections: more than this process can open") for line in lines
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_explicit_watchers_must_fit_inside_the_connection_cap(tmp_path: Path) -> None:
    done = run_agent(tmp_path, solo_config(max_connections=100, max_watchers=100), nofile=4096)
    assert done.returncode == 2, done
    assert "api.max_watchers: must leave 16 of the 100 connections" in done.stderr
