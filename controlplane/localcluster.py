"""A whole deployment on loopback: simulated region backends plus real agent processes.

The demo, the acceptance tests and the benchmarks all need the same thing: start N
agents as real processes with a generated config, simulated backends they can probe,
optionally a fault-injecting proxy between every pair of agents, and tear it all down
(every process, every port) even when something fails. This module is that harness.
It is test infrastructure that ships with the package because `controlplane demo` uses
it; the agents it starts are the real daemon, unmodified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controlplane.faultproxy import ProxyMesh
from controlplane.sim.backend import SimBackend

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=3.0)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def load_demo_config(path: Path | None = None) -> dict[str, Any]:
    source = path or DEMO_CONFIG
    data: Any = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a mapping")
    return {str(k): v for k, v in data.items()}


def remap_ports(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with every loopback port replaced by a free one."""
    mapping: dict[int, int] = {}

    def new(port: int) -> int:
        if port not in mapping:
            mapping[port] = free_port()
        return mapping[port]

    out: dict[str, Any] = json.loads(json.dumps(config))
    for agent in out["cluster"]["agents"]:
        for key in ("raft", "http"):
            host, port = _split(agent[key])
            agent[key] = f"{host}:{new(port)}"
    for region in out["regions"].values():
        for svc in region["services"].values():
            targets = []
            for t in svc["targets"]:
                url = t if isinstance(t, str) else t["url"]
                scheme, _, rest = url.partition("://")
                hostport, slash, path = rest.partition("/")
                host, port = _split(hostport)
                new_url = f"{scheme}://{host}:{new(port)}{slash}{path}"
                targets.append(new_url if isinstance(t, str) else {**t, "url": new_url})
            svc["targets"] = targets
    return out


@dataclass
class AgentProcess:
    id: str
    region: str
    http: str
    raft: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    """Start with `async with LocalCluster(config) as c:`; everything stops on exit."""

    config: dict[str, Any]
    workdir: Path | None = None
    with_proxies: bool = False
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    cluster_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_env: Mapping[str, str] = field(default_factory=dict)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    backends: dict[tuple[str, str], SimBackend] = field(default_factory=dict)
    mesh: ProxyMesh | None = None
    config_path: Path | None = None
    _own_workdir: bool = False
    _session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="controlplane-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = {**self.config, "data_dir": str(self.workdir / "data")}
        self.config_path = self.workdir / "cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        await self.start_backends()
        if self.with_proxies:
            self.mesh = ProxyMesh({a["id"]: a["raft"] for a in self.config["cluster"]["agents"]})
            await self.mesh.start()
        for a in self.config["cluster"]["agents"]:
            self.agents[a["id"]] = AgentProcess(
                id=a["id"],
                region=a["region"],
                http=a["http"],
                raft=a["raft"],
                data_dir=self.workdir / "data" / a["id"],
                log_path=self.workdir / f"{a['id']}.log",
            )
        for agent_id in self.agents:
            self.start_agent(agent_id)

    async def stop(self) -> None:
        for agent_id in list(self.agents):
            self.kill_agent(agent_id, signal.SIGTERM, wait=False)
        deadline = time.monotonic() + 5.0
        for a in self.agents.values():
            if a.proc is None:
                continue
            try:
                await asyncio.to_thread(a.proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                a.proc.kill()
                await asyncio.to_thread(a.proc.wait, 5)
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        for backend in self.backends.values():
            with contextlib.suppress(Exception):
                await backend.stop()
        self.backends.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_workdir and self.workdir is not None and not os.environ.get("CONTROLPLANE_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def start_backends(self) -> None:
        for region, rc in self.config["regions"].items():
            for service, sc in rc["services"].items():
                t = sc["targets"][0]
                url = t if isinstance(t, str) else t["url"]
                host, port = _split(url.partition("://")[2].partition("/")[0])
                backend = SimBackend(region, service, host=host, port=port, admin_port=None)
                await backend.start()
                self.backends[(region, service)] = backend

    # -- agents ------------------------------------------------------------------------

    def env_for(self, agent_id: str) -> dict[str, str]:
        env = {
            **os.environ,
            "CONTROLPLANE_CLUSTER_SECRET": self.cluster_secret,
            "CONTROLPLANE_ADMIN_TOKEN": self.admin_token,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        if self.mesh is not None:
            env["CONTROLPLANE_RAFT_DIAL"] = json.dumps(self.mesh.dial_map(agent_id))
        return env

    def start_agent(self, agent_id: str, extra_env: Mapping[str, str] | None = None) -> AgentProcess:
        a = self.agents[agent_id]
        if a.alive:
            raise RuntimeError(f"{agent_id} is already running")
        assert self.config_path is not None
        log = a.log_path.open("ab")
        try:
            a.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controlplane",
                    "agent",
                    "-c",
                    str(self.config_path),
                    "--id",
                    agent_id,
                    "--data-dir",
                    str(a.data_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env_for(agent_id), **(extra_env or {})},
                start_new_session=True,
            )
        finally:
            log.close()
        return a

    def kill_agent(self, agent_id: str, sig: signal.Signals = signal.SIGKILL, wait: bool = True) -> None:
        a = self.agents[agent_id]
        if a.proc is None or a.proc.poll() is not None:
            return
        if sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.proc.pid, sig)
        if wait and sig in (signal.SIGKILL, signal.SIGTERM):
            a.proc.wait(timeout=10)

    def pause_agent(self, agent_id: str) -> None:
        self.kill_agent(agent_id, signal.SIGSTOP, wait=False)

    def resume_agent(self, agent_id: str) -> None:
        self.kill_agent(agent_id, signal.SIGCONT, wait=False)

    def log_of(self, agent_id: str) -> str:
        path = self.agents[agent_id].log_path
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # -- backends ----------------------------------------------------------------------

    async def set_backend(self, region: str, service: str | None = None, **state: Any) -> None:
        """Change the simulated backends of `region` (every service when None)."""
        for (r, s), backend in self.backends.items():
            if r == region and (service is None or s == service):
                await backend.set_state(**state)

    async def fail_region(self, region: str, service: str | None = None) -> None:
        await self.set_backend(region, service, healthy=False, mode="refuse")

    async def heal_region(self, region: str, service: str | None = None) -> None:
        await self.set_backend(region, service, healthy=True, mode="normal", latency_ms=0)

    # -- reading the agents ------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "cluster not started"
        return self._session

    async def get(self, agent_id: str, path: str) -> tuple[int, dict[str, str], Any]:
        """One GET to one agent: (status, headers, JSON body); status 0 when unreachable."""
        try:
            async with self.session.get(self.agents[agent_id].url + path) as r:
                body = await r.json(content_type=None)
                return r.status, dict(r.headers), body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, {}, None

    async def decision(self, agent_id: str) -> dict[str, Any] | None:
        status, headers, body = await self.get(agent_id, "/v1/decision")
        if status != 200 or not isinstance(body, dict):
            return None
        body["_stale"] = headers.get("X-Controlplane-Stale")
        return body

    async def decisions(self, agent_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        ids = list(agent_ids or [a.id for a in self.agents.values() if a.alive])
        found = await asyncio.gather(*(self.decision(i) for i in ids))
        return dict(zip(ids, found, strict=True))

    async def wait_for(self, predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
        """Poll the async `predicate()` until it returns something truthy; TimeoutError names `what`."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await predicate()
            if last:
                return last
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")

    async def wait_ready(
        self, timeout_s: float = 30.0, agent_ids: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Every (given, live) agent is ready and serves the same revision."""
        ids = list(agent_ids or self.agents)

        async def all_ready() -> dict[str, Any] | None:
            for i in ids:
                status, _, _ = await self.get(i, "/readyz")
                if status != 200:
                    self.check_alive(ids)
                    return None
            ds = await self.decisions(ids)
            revisions = {d["revision"] for d in ds.values() if d}
            if len(revisions) == 1 and all(ds.values()):
                return next(iter(ds.values()))
            return None

        result: dict[str, Any] = await self.wait_for(all_ready, timeout_s, f"agents {ids} ready")
        return result

    def check_alive(self, agent_ids: Iterable[str]) -> None:
        for i in agent_ids:
            a = self.agents[i]
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"agent {i} exited with {a.proc.returncode}:\n{self.log_of(i)[-3000:]}")

    async def leader(self) -> str | None:
        for a in self.agents.values():
            if not a.alive:
                continue
            status, _, body = await self.get(a.id, "/v1/cluster")
            if status == 200 and body.get("is_leader") and body.get("has_quorum"):
                return str(a.id)
        return None

    async def wait_leader(self, timeout_s: float = 20.0, exclude: Iterable[str] = ()) -> str:
        excluded = set(exclude)

        async def find() -> str | None:
            leader = await self.leader()
            return leader if leader and leader not in excluded else None

        result: str = await self.wait_for(find, timeout_s, "a leader")
        return result

    async def post(self, agent_id: str, path: str, body: Any, token: str | None = "admin") -> tuple[int, Any]:
        headers = {}
        if token == "admin":
            headers["Authorization"] = f"Bearer {self.admin_token}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self.session.post(self.agents[agent_id].url + path, json=body, headers=headers) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, None
