"""Real HAProxy and nginx on loopback, the adapters as processes, and a traffic client.

- `HAProxy` writes a configuration (runtime API on a temporary unix socket, `level
  admin`), runs `haproxy -db` in the foreground and can restart it on the same ports.
- `Nginx` runs nginx with a temporary prefix, pid file and error log, in the foreground.
- `Adapter` runs `controlplane lb haproxy|nginx` as a process (the real CLI), with its log
  and JSON status file in the test's directory.
- `Traffic` sends a steady stream of requests through a load balancer and records, per
  request, when it was sent and which region answered (the backends' `X-Region` header)
  or that it failed.

A missing binary fails the test naming the Debian package; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.lb.haproxy import RuntimeApi, ServerState
from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports
from controlplane.testing.ports import free_port

SERVICE = "order"
FAILED = "cn-east"
REGIONS = ("cn-east", "cn-south", "cn-north")
SERVER_NAMES = {"cn-east": "east", "cn-south": "south", "cn-north": "north"}
CONTROLPLANE = Path(sys.executable).parent / "controlplane"
WAIT_S = 60.0  # generous: the machine is shared

StartCluster = Callable[..., Awaitable[LocalCluster]]  # the `cluster` fixture of conftest.py


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y {package}")
    return path


def lb_config() -> dict[str, Any]:
    """The demo deployment on free ports with short holds, so a test sees a full recovery."""
    config = remap_ports(load_demo_config())
    config["policy"].update({"recovery_hold_s": 2.0, "ramp_step_s": 1.5})
    return config


def backend_addresses(cluster: LocalCluster, service: str = SERVICE) -> dict[str, str]:
    return {r: f"127.0.0.1:{b.port}" for (r, s), b in cluster.backends.items() if s == service}


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = WAIT_S, interval_s: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


async def every_agent(cluster: LocalCluster, check: Callable[[dict[str, Any]], bool], what: str) -> int:
    """Wait until every agent serves a decision passing `check`; the highest revision."""

    async def probe() -> int | None:
        ds = await cluster.decisions()
        if ds and all(d is not None and check(d) for d in ds.values()):
            return max(int(d["revision"]) for d in ds.values() if d)
        return None

    revision: int = await eventually(probe, what)
    return revision


def order_weights(decision: Mapping[str, Any]) -> dict[str, int]:
    return {r: int(p["weight"]) for r, p in decision["services"][SERVICE].items()}


# -- the traffic client ----------------------------------------------------------------


@dataclass
class Traffic:
    """Requests through `url` from a few sequential workers; one record per request."""

    url: str
    workers: int = 2
    pause_s: float = 0.01
    records: list[tuple[float, str]] = field(default_factory=list)  # (sent at, region or "error:...")
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Traffic:
        # A new connection per request: a reload closing idle keep-alive connections
        # must not show up as a failed request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=5)
        )
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _worker(self) -> None:
        assert self._session is not None
        while True:
            sent = time.monotonic()
            try:
                async with self._session.get(self.url + "/") as r:
                    await r.read()
                    region = r.headers.get("X-Region")
                    result = region if r.status == 200 and region else f"error:{r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                result = f"error:{type(e).__name__}"
            self.records.append((sent, result))
            await asyncio.sleep(self.pause_s)

    def since(self, start: float, end: float | None = None) -> Counter[str]:
        return Counter(r for t, r in self.records if t >= start and (end is None or t < end))

    async def window(self, seconds: float, min_requests: int = 150) -> Counter[str]:
        """Results of the requests sent during the next `seconds` (at least `min_requests`)."""
        start = time.monotonic()
        await asyncio.sleep(seconds)
        await eventually(
            lambda: _true(len([1 for t, _ in self.records if t >= start]) >= min_requests),
            f"{min_requests} requests through {self.url}",
        )
        return self.since(start)

    def moved_at(self, fault_at: float, bad: Callable[[str], bool]) -> float | None:
        """When the last bad request after `fault_at` was sent (None: there was none)."""
        times = [t for t, r in self.records if t >= fault_at and bad(r)]
        return max(times) if times else None


async def _true(value: bool) -> bool:
    return value


def assert_split(
    counts: Counter[str], weights: Mapping[str, int], what: str, tolerance: float = 0.05
) -> None:
    """Every region's share of the requests is its weight within `tolerance`; no failures
    beyond 1% and at least 99% of requests to regions with weight > 0."""
    total = sum(counts.values())
    assert total > 0, f"{what}: no requests"
    serving = {r for r, w in weights.items() if w > 0}
    good = sum(n for r, n in counts.items() if r in serving)
    assert good / total >= 0.99, (
        f"{what}: only {good}/{total} requests reached serving regions: {dict(counts)}"
    )
    weight_sum = sum(weights.values())
    for region, w in weights.items():
        share = counts[region] / total
        assert abs(share - w / weight_sum) <= tolerance, (
            f"{what}: {region} got {share:.1%} of {total} requests, its weight is {w}/{weight_sum}: "
            f"{dict(counts)}"
        )


# -- HAProxy ---------------------------------------------------------------------------


@dataclass
class HAProxy:
    workdir: Path
    servers: Mapping[str, str]  # region -> host:port
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.binary = require_binary("haproxy", "haproxy")
        self.port = self.port or free_port()
        self.socket = self.workdir / "haproxy.sock"
        self.config = self.workdir / "haproxy.cfg"
        self.log = self.workdir / "haproxy.log"
        # Every server starts at the same weight: only the adapter makes the split.
        # No health checks and no redispatch, so what moves traffic is the adapter.
        lines = [
            "global",
            f"    stats socket {self.socket} mode 600 level admin",
            "    stats timeout 30s",
            "defaults",
            "    mode http",
            "    timeout connect 1s",
            "    timeout client 10s",
            "    timeout server 10s",
            "    retries 0",
            "frontend fe_order",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend be_order",
            "backend be_order",
            "    balance roundrobin",
        ]
        lines += [f"    server {SERVER_NAMES[r]} {addr} weight 10" for r, addr in self.servers.items()]
        self.config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([self.binary, "-c", "-f", str(self.config)], capture_output=True, check=False)
        assert check.returncode == 0, check.stderr.decode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def map_file(self) -> Path:
        path = self.workdir / "haproxy-map.yaml"
        servers = {r: SERVER_NAMES[r] for r in self.servers}
        path.write_text(json.dumps({SERVICE: {"backend": "be_order", "servers": servers}}))
        return path

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - starting is quick; it is not waited for
                [self.binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        api = RuntimeApi(self.socket, timeout_s=2.0)

        async def answering() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"haproxy exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(Exception):
                return "Name: HAProxy" in await api.command("show info")
            return False

        await eventually(answering, "HAProxy's runtime API")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        self.proc = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def servers_state(self) -> dict[str, ServerState]:
        live = await RuntimeApi(self.socket).servers_state()
        names = {v: k for k, v in SERVER_NAMES.items()}
        return {names[srv]: state for (be, srv), state in live.items() if be == "be_order"}


# -- nginx -----------------------------------------------------------------------------

NGINX_TEMPLATE = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    # controlplane:upstream order

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://order;
            # No retry on another server: what moves traffic is the adapter.
            proxy_next_upstream off;
            proxy_connect_timeout 1s;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    workdir: Path
    servers: Mapping[str, str]  # region -> host:port
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.binary = require_binary("nginx", "nginx")
        self.port = self.port or free_port()
        self.prefix = self.workdir / "nginx"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.template = self.workdir / "nginx.conf.template"
        self.template.write_text(NGINX_TEMPLATE.format(prefix=self.prefix, port=self.port))
        self.config = self.prefix / "nginx.conf"
        self.error_log = self.prefix / "error.log"
        # The operator's starting point: every region at the same weight.
        static = "upstream order {\n" + "".join(f"    server {a};\n" for a in self.servers.values()) + "}"
        self.config.write_text(self.template.read_text().replace("# controlplane:upstream order", static))

    def args(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.config),
            "-e",
            str(self.error_log),
            *extra,
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def map_file(self) -> Path:
        path = self.workdir / "nginx-map.yaml"
        entry = {"servers": dict(self.servers), "server_params": "max_fails=0"}
        path.write_text(json.dumps({SERVICE: entry}))
        return path

    def master_pid(self) -> int:
        return int((self.prefix / "nginx.pid").read_text().strip())

    async def start(self) -> None:
        check = await asyncio.to_thread(subprocess.run, self.args("-t"), capture_output=True, check=False)
        assert check.returncode == 0, check.stderr.decode()
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starting is quick; it is not waited for
            self.args("-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

        async def serving() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"nginx exited with {self.proc.returncode}: {self.error_log.read_text()[-2000:]}")
            try:
                async with aiohttp.ClientSession() as s, s.get(self.url + "/") as r:
                    return r.status in (200, 502, 503)
            except aiohttp.ClientError:
                return False

        await eventually(serving, "nginx to serve")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        self.proc = None


# -- the adapters as processes ---------------------------------------------------------


@dataclass
class Adapter:
    kind: str  # "haproxy" | "nginx"
    workdir: Path
    args: Sequence[str]
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.status_path = self.workdir / f"lb-{self.kind}.status.json"
        self.log_path = self.workdir / f"lb-{self.kind}.log"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(CONTROLPLANE), "lb", self.kind, *self.args, "--status-file", str(self.status_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"lb {self.kind} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    async def applied(self, revision: int, what: str) -> dict[str, Any]:
        """Wait until the adapter reports `revision` (or a later one) applied without error."""

        async def probe() -> dict[str, Any] | None:
            self.check_alive()
            s = self.status()
            if s.get("ok") and int(s.get("applied_revision") or 0) >= revision:
                return s
            return None

        result: dict[str, Any] = await eventually(
            probe, f"lb {self.kind} to apply {what} (revision {revision})"
        )
        return result

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = await asyncio.to_thread(self.proc.wait, 10)
            assert code == 0, f"lb {self.kind} exited with {code} on SIGTERM:\n{self.log()[-3000:]}"
        self.proc = None


def agent_args(cluster: LocalCluster) -> list[str]:
    out = []
    for a in cluster.agents.values():
        out += ["--agent", a.url]
    return out


# -- the scenario both load balancers go through ----------------------------------------


async def failover_and_recovery(
    cluster: LocalCluster, lb_url: str, adapter: Adapter, measure: Callable[[str], None], label: str
) -> None:
    """Traffic through the load balancer follows cn-east down, then back after hold and ramp.

    Asserts the split matches the weights (within 5 points, at least 99% of requests to
    serving regions) when healthy, after the failover and after the recovery; records
    the time from the fault to the last request that went to cn-east or failed.
    """
    healthy = await cluster.wait_ready(WAIT_S)
    base = order_weights(healthy)
    await adapter.applied(int(healthy["revision"]), "the healthy decision")
    async with Traffic(lb_url) as traffic:
        assert_split(await traffic.window(3), base, f"{label}, every region healthy")

        fault_at = time.monotonic()
        await cluster.fail_region(FAILED)
        revision = await every_agent(
            cluster, lambda d: d["services"][SERVICE][FAILED]["state"] == "down", "cn-east/order down"
        )
        decided_s = time.monotonic() - fault_at
        await adapter.applied(revision, "the failover")
        applied_s = time.monotonic() - fault_at
        survivors = order_weights(await latest(cluster))
        assert survivors[FAILED] == 0 and sum(survivors.values()) == 100, survivors
        counts = await traffic.window(4)
        assert order_weights(await latest(cluster)) == survivors, "the weights changed while measuring"
        assert_split(counts, survivors, f"{label}, after the failover")
        moved = traffic.moved_at(fault_at, lambda r: r == FAILED or r.startswith("error"))
        moved_s = 0.0 if moved is None else moved - fault_at
        failed = sum(n for r, n in traffic.since(fault_at).items() if r.startswith("error"))
        measure(
            f"{label}: fault -> traffic moved (last request to cn-east or failed) {moved_s:.2f} s; "
            f"decision on every agent {decided_s:.2f} s; adapter reported applied {applied_s:.2f} s; "
            f"{failed} requests failed meanwhile"
        )

        healed_at = time.monotonic()
        await cluster.heal_region(FAILED)
        revision = await every_agent(
            cluster,
            lambda d: order_weights(d) == base and d["services"][SERVICE][FAILED]["ramp"] == 1.0,
            "cn-east back at its base weight after hold and ramp",
        )
        await adapter.applied(revision, "the recovery")
        counts = await traffic.window(4)
        assert_split(counts, base, f"{label}, after recovery and ramp")
        back = min((t for t, r in traffic.records if t >= healed_at and r == FAILED), default=None)
        assert back is not None
        measure(f"{label}: healed -> first request to cn-east again {back - healed_at:.2f} s (hold 2 s)")


async def latest(cluster: LocalCluster) -> dict[str, Any]:
    """The newest decision any agent serves."""
    ds = [d for d in (await cluster.decisions()).values() if d is not None]
    assert ds, "no agent serves a decision"
    return max(ds, key=lambda d: int(d["revision"]))
