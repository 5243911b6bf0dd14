"""Real peers for the failover benchmark: Redis Sentinel and HAProxy's own health checks.

Both run as the Debian binaries, on loopback ports chosen here, with the same detection
settings as the agents (`down-after-milliseconds` = interval x fall for Sentinel;
`inter` = interval, `fall`, `rise` for HAProxy), and both are stopped by PID.

- `SentinelPeer`: one master, one replica, three sentinels (quorum 2). A trial kills the
  current master with SIGKILL and listens on every sentinel's pub/sub for `+sdown`,
  `+odown` and `+switch-master`; then it restarts the killed server (the sentinels turn
  it into a replica of the new master) and waits until all is settled again.
- `HaproxyPeer`: HAProxy in front of three `SimBackend`s (the same simulated backends the
  agents probe), `option httpchk GET /healthz`. A trial puts one backend in the fault
  mode and polls the stats socket (`show stat`) every 10 ms until HAProxy marks that
  server DOWN: from then on it sends it no requests.

A tiny RESP client over asyncio streams is all Redis needs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Processes, require_binary, wait_port
from controlplane.testing.backend import SimBackend
from controlplane.testing.ports import free_port

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
SETTLE_TIMEOUT_S = 60.0


# -- RESP ---------------------------------------------------------------------------------


def encode(*args: str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [await read_reply(reader) for _ in range(n)]
    raise RespError(f"unexpected reply {line!r}")


async def command(port: int, *args: str | int, timeout_s: float = 2.0) -> Any:
    """One command on a new connection."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(encode(*args))
            await writer.drain()
            return await read_reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def pairs(flat: list[Any]) -> dict[str, Any]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def info_fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


# -- Sentinel -----------------------------------------------------------------------------


@dataclass
class SentinelPeer:
    """1 master + 1 replica + 3 sentinels, quorum 2, on free loopback ports."""

    procs: Processes
    down_after_ms: int
    failover_timeout_ms: int = 10_000
    sentinels: int = 3
    quorum: int = 2
    redis_ports: dict[str, int] = field(default_factory=dict)  # process name -> port
    sentinel_ports: list[int] = field(default_factory=list)
    events: list[tuple[float, int, str, str]] = field(default_factory=list)  # (at, sentinel, channel, data)
    _listeners: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "sentinels": self.sentinels,
            "quorum": self.quorum,
            "down_after_ms": self.down_after_ms,
            "failover_timeout_ms": self.failover_timeout_ms,
            "replicas": 1,
        }

    async def start(self) -> None:
        server = require_binary("redis-server", "redis-server")
        sentinel = require_binary("redis-sentinel", "redis-sentinel")
        taken: set[int] = set()
        self.sentinel_ports.clear()
        for name in ("redis-a", "redis-b"):
            self.redis_ports[name] = free_port(exclude=taken)
            taken.add(self.redis_ports[name])
        for _ in range(self.sentinels):
            self.sentinel_ports.append(free_port(exclude=taken))
            taken.add(self.sentinel_ports[-1])
        master_port = self.redis_ports["redis-a"]
        self._start_redis(server, "redis-a")
        self._start_redis(server, "redis-b", replica_of=master_port)
        for port in self.redis_ports.values():
            await wait_port(port)
        await self._until(self._replica_linked, "the replica to sync")
        for i, port in enumerate(self.sentinel_ports):
            conf = self.procs.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\ndaemonize no\ndir {self.procs.workdir}\n"
                f"sentinel monitor {MASTER_NAME} {HOST} {master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.procs.start(f"sentinel-{i}", [sentinel, str(conf)])
        for port in self.sentinel_ports:
            await wait_port(port)
        for i, port in enumerate(self.sentinel_ports):
            self._listeners.append(asyncio.create_task(self._listen(i, port), name=f"sentinel-{i} events"))
        await self._until(self._settled, "the sentinels to discover each other and the replica")

    def _start_redis(self, server: str, name: str, replica_of: int | None = None) -> None:
        argv = [
            server,
            "--port",
            str(self.redis_ports[name]),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.procs.workdir),
            "--dbfilename",
            f"{name}.rdb",
            "--repl-diskless-sync-delay",
            "0",
        ]
        if replica_of is not None:
            argv += ["--replicaof", HOST, str(replica_of)]
        self.procs.start(name, argv)

    async def stop(self) -> None:
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        self._listeners.clear()
        # The processes themselves are stopped by the owner of `procs`.

    async def _listen(self, index: int, port: int) -> None:
        """Record every event this sentinel publishes, with its arrival time."""
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                writer.write(encode("PSUBSCRIBE", "*"))
                await writer.drain()
                while True:
                    msg = await read_reply(reader)
                    if isinstance(msg, list) and msg and msg[0] == "pmessage":
                        self.events.append((time.time(), index, str(msg[2]), str(msg[3])))
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)
            finally:
                writer.close()

    async def _until(self, check: Any, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RespError, TimeoutError, ConnectionError):
                found = await check()
                if found:
                    return found
            for name in self.procs.procs:
                if name.startswith("sentinel-"):
                    self.procs.check_alive(name)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"sentinel peer: timed out waiting for {what}")

    async def _replica_linked(self) -> bool:
        for port in self.redis_ports.values():
            info = info_fields(await command(port, "INFO", "replication"))
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    async def master_port(self) -> int:
        addr = await command(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return int(addr[1])

    async def _settled(self) -> bool:
        """Every sentinel agrees on the master, sees it up, and knows the other sentinels
        and a connected, synced replica."""
        masters = set()
        for port in self.sentinel_ports:
            m = pairs(await command(port, "SENTINEL", "master", MASTER_NAME))
            if m.get("flags") != "master" or int(m.get("num-other-sentinels", 0)) < self.sentinels - 1:
                return False
            masters.add(int(m["port"]))
            replicas = [pairs(r) for r in await command(port, "SENTINEL", "replicas", MASTER_NAME)]
            if not any(r.get("flags") == "slave" and r.get("master-link-status") == "ok" for r in replicas):
                return False
        if len(masters) != 1:
            return False
        return await self._replica_linked()

    async def trial(self) -> dict[str, Any]:
        """Kill the master; times (s) from the kill to each sentinel event."""
        await self._until(self._settled, "the sentinels to settle before the trial")
        port = await self.master_port()
        name = next(n for n, p in self.redis_ports.items() if p == port)
        mark = len(self.events)
        t_fault = time.time()
        self.procs.kill(name, signal.SIGKILL)

        def stage(channel: str, last: bool = False) -> float | None:
            times = [
                at
                for at, _, ch, data in self.events[mark:]
                if ch == channel and (channel == "+switch-master" or data.startswith("master "))
            ]
            if not times:
                return None
            return round((max(times) if last else min(times)) - t_fault, 4)

        def switched_everywhere() -> bool:
            seen = {i for _, i, ch, _ in self.events[mark:] if ch == "+switch-master"}
            return len(seen) == self.sentinels

        async def switched() -> bool:
            return switched_everywhere()

        try:
            await self._until(switched, "+switch-master from every sentinel", timeout_s=60)
        except TimeoutError:
            if stage("+switch-master") is None:
                raise
        result = {
            "killed": name,
            "sdown_s": stage("+sdown"),
            "odown_s": stage("+odown"),
            "switch_master_first_s": stage("+switch-master"),
            "switch_master_all_s": stage("+switch-master", last=True) if switched_everywhere() else None,
        }
        result["total_s"] = result["switch_master_first_s"]
        # Bring the killed server back as a replica of the new master, as an operator
        # would (left to itself Sentinel converts it too, but only after 8 s or more).
        self._start_redis(require_binary("redis-server", "redis-server"), name, await self.master_port())
        await wait_port(self.redis_ports[name])
        await self._until(self._settled, "the old master to rejoin as a replica")
        return result


# -- HAProxy ------------------------------------------------------------------------------

SERVER_NAMES = ("east", "south", "north")
REGIONS = ("cn-east", "cn-south", "cn-north")


@dataclass
class HaproxyPeer:
    """HAProxy health-checking three simulated backends of one service."""

    procs: Processes
    interval_s: float
    fall: int
    rise: int
    timeout_s: float
    backends: dict[str, SimBackend] = field(default_factory=dict)
    port: int = 0
    socket_path: Path | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "inter_ms": round(self.interval_s * 1000),
            "fall": self.fall,
            "rise": self.rise,
            "timeout_check_ms": round(self.timeout_s * 1000),
            "check": "option httpchk GET /healthz",
            "servers": len(SERVER_NAMES),
        }

    async def start(self) -> None:
        haproxy = require_binary("haproxy", "haproxy")
        for server, region in zip(SERVER_NAMES, REGIONS, strict=True):
            backend = SimBackend(region, "order", host=HOST, port=0, admin_port=None)
            await backend.start()
            self.backends[server] = backend
        self.port = free_port(exclude=[b.port for b in self.backends.values()])
        self.socket_path = self.procs.workdir / "haproxy.sock"
        inter = round(self.interval_s * 1000)
        timeout = round(self.timeout_s * 1000)
        servers = "\n".join(f"    server {name} {HOST}:{b.port} check" for name, b in self.backends.items())
        conf = self.procs.workdir / "haproxy.cfg"
        conf.write_text(
            f"global\n    stats socket {self.socket_path} mode 600 level admin\n    maxconn 2000\n\n"
            "defaults\n    mode http\n    timeout connect 1s\n    timeout client 10s\n"
            f"    timeout server 10s\n    timeout check {timeout}ms\n\n"
            f"frontend fe\n    bind {HOST}:{self.port}\n    default_backend be\n\n"
            "backend be\n    balance roundrobin\n    option httpchk GET /healthz\n"
            f"    default-server inter {inter} fall {self.fall} rise {self.rise}\n{servers}\n"
        )
        self.procs.start("haproxy", [haproxy, "-db", "-f", str(conf)])
        await wait_port(self.port)
        await self._until_status(lambda s: all(v == "UP" for v in s.values()), "every server UP")

    async def stop(self) -> None:
        self.procs.stop("haproxy")
        for backend in self.backends.values():
            with contextlib.suppress(Exception):
                await backend.stop()
        self.backends.clear()

    async def status(self) -> dict[str, str]:
        """`show stat`: each server's status (UP, DOWN, "UP 1/2" while going down...)."""
        assert self.socket_path is not None
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            text = (await reader.read()).decode()
        finally:
            writer.close()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            r["svname"]: r["status"] for r in rows if r.get("pxname") == "be" and r["svname"] in self.backends
        }

    async def _until_status(
        self, check: Any, what: str, timeout_s: float = 30.0, poll_s: float = 0.01
    ) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status = await self.status()
            except OSError:
                status = {}
            if status and check(status):
                return time.time()
            self.procs.check_alive("haproxy")
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"haproxy peer: timed out waiting for {what}")

    async def trial(self, server: str, fault: str) -> dict[str, Any]:
        """Fail `server`'s backend; seconds until HAProxy marks it DOWN, then heal it."""
        backend = self.backends[server]
        await self._until_status(lambda s: all(v == "UP" for v in s.values()), "every server UP")
        t_fault = time.time()
        await backend.set_state(**FAULTS[fault])
        t_down = await self._until_status(lambda s: s[server].startswith("DOWN"), f"{server} DOWN")
        t_heal = time.time()
        await backend.set_state(**HEALED)
        t_up = await self._until_status(lambda s: s[server] == "UP", f"{server} UP again")
        return {
            "server": server,
            "total_s": round(t_down - t_fault, 4),
            "recovery_s": round(t_up - t_heal, 4),
        }


FAULTS: dict[str, dict[str, Any]] = {
    "refuse": {"healthy": False, "mode": "refuse"},
    "503": {"healthy": False, "mode": "normal"},
    "blackhole": {"healthy": False, "mode": "blackhole"},
}
HEALED: dict[str, Any] = {"healthy": True, "mode": "normal", "latency_ms": 0}
