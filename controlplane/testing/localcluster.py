"""A whole deployment on loopback: simulated region backends plus real agent processes.

The demo, the acceptance tests and the benchmarks all need the same thing: start N
agents as real processes with a generated config, simulated backends they can probe,
optionally a fault-injecting proxy between every pair of agents, and tear it all down
(every process, every port) even when something fails. This module is that harness.
It is test infrastructure that ships with the package because `controlplane demo` uses
it; the agents it starts are the real daemon, unmodified.

Faults it can inject, all real: a backend that refuses, blackholes or answers 503
(`fail_region`, `set_backend`), a process killed, stopped or restarted (`kill_agent`,
`pause_agent`, `stop_agent`, `start_agent`), a partition between agents (`mesh`, with
`with_proxies=True`), and one observer's own path to a region cut while the others still
reach it (`observer_paths` plus `cut_observer`): that agent is started with a config of
its own whose targets for those regions point at `FaultProxy`s in front of the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import yaml

from controlplane.client.tls import client_context
from controlplane.testing.backend import SimBackend
from controlplane.testing.faultproxy import FaultProxy, ProxyMesh
from controlplane.testing.ports import free_port, release
from controlplane.testing.reading import HTTP_TIMEOUT, AgentsReader

if TYPE_CHECKING:  # the harness runs without the cryptography package unless TLS is on
    from controlplane.testing.tls import Certificates

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # package data


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _with_port(url: str, port: int) -> str:
    """`url` (http://host:port/path or tcp://host:port) with its port replaced."""
    scheme, _, rest = url.partition("://")
    hostport, slash, path = rest.partition("/")
    host, _ = _split(hostport)
    return f"{scheme}://{host}:{port}{slash}{path}"


def _url_of(target: Any) -> str | None:
    """A target's URL; None for a target that is not one (a prometheus probe)."""
    if isinstance(target, str):
        return target
    url = target.get("url")
    return None if url is None else str(url)


def _hostport(url: str) -> str:
    return url.partition("://")[2].partition("/")[0]


def service_address(svc: Mapping[str, Any]) -> str:
    """Where a service's backend listens: its `address`, else its first URL target's host:port."""
    if svc.get("address"):
        return str(svc["address"])
    for t in svc["targets"]:
        url = _url_of(t)
        if url is not None:
            return _hostport(url)
    raise ValueError("a service needs an address or a target with a URL")


def _config_ports(config: Mapping[str, Any]) -> set[int]:
    """Every port `config` has agents or targets listen on."""
    ports = {_split(a[key])[1] for a in config["cluster"]["agents"] for key in ("raft", "http")}
    for region in config["regions"].values():
        for svc in region["services"].values():
            ports.add(_split(service_address(svc))[1])
            for t in svc["targets"]:
                url = _url_of(t)
                if url is not None:
                    ports.add(_split(_hostport(url))[1])
    return ports


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
            # Nothing is bound yet: without the exclusion two ports could come out the same.
            mapping[port] = free_port(exclude=mapping.values())
        return mapping[port]

    out: dict[str, Any] = json.loads(json.dumps(config))
    for agent in out["cluster"]["agents"]:
        for key in ("raft", "http"):
            host, port = _split(agent[key])
            agent[key] = f"{host}:{new(port)}"
    for region in out["regions"].values():
        for svc in region["services"].values():
            if svc.get("address"):
                host, port = _split(svc["address"])
                svc["address"] = f"{host}:{new(port)}"
            targets = []
            for t in svc["targets"]:
                url = _url_of(t)
                if url is None:
                    targets.append(t)
                    continue
                new_url = _with_port(url, new(_split(_hostport(url))[1]))
                targets.append(new_url if isinstance(t, str) else {**t, "url": new_url})
            svc["targets"] = targets
    return out


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def clock_offset_env(offset_s: float) -> dict[str, str]:
    """Environment that runs an agent with its wall clock `offset_s` off (libfaketime).

    A real clock fault, without a hook in the product: `time.time()` in that process is
    shifted, its monotonic clock is not (as with an NTP misconfiguration). Needs Debian's
    `faketime` package; fails, naming it, without.
    """
    if not LIBFAKETIME.exists():
        raise RuntimeError(f"{LIBFAKETIME} is missing: install the Debian package faketime")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{offset_s:+g}s",
        "DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


@dataclass
class AgentProcess:
    id: str
    region: str
    http: str
    raft: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"  # https when the cluster serves TLS

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.http}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


ObserverFault = Literal["refuse", "reset", "blackhole"]


@dataclass
class LocalCluster(AgentsReader):
    """Start with `async with LocalCluster(config) as c:`; everything stops on exit.

    `observer_paths` maps an agent id to regions that this agent (only) probes through
    fault proxies of its own, so that `cut_observer` can cut its view of a region while
    the other agents still reach the same backends.

    `tls` (`testing.tls.make_certificates`): every agent serves HTTPS with its server
    certificate, and with `mutual_tls` requires a client certificate signed by its CA;
    the cluster's own reads trust that CA and present its client certificate.
    """

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
    observer_paths: Mapping[str, Iterable[str]] = field(default_factory=dict)
    target_proxies: dict[tuple[str, str], list[FaultProxy]] = field(default_factory=dict)
    agent_config_paths: dict[str, Path] = field(default_factory=dict)
    tls: Certificates | None = None
    mutual_tls: bool = False
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

    async def start(self, agents: bool = True) -> None:
        """Start backends, proxies and (unless `agents` is False) every agent.

        With `agents=False` the backends can be put in a state before any agent probes
        them; start the agents with `start_agent`.
        """
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="controlplane-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = {**self.config, "data_dir": str(self.workdir / "data")}
        if self.tls is not None:
            tls = {"cert_file": str(self.tls.server.cert_file), "key_file": str(self.tls.server.key_file)}
            if self.mutual_tls:
                tls["client_ca_file"] = str(self.tls.ca_file)
            self.config["api"] = {**self.config.get("api", {}), "tls": tls}
        self.config_path = self.workdir / "cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        context = self.client_ssl
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT, connector=connector)
        await self.start_backends()
        await self._start_observer_paths()
        if self.with_proxies:
            self.mesh = ProxyMesh({a["id"]: a["raft"] for a in self.config["cluster"]["agents"]})
            await self.mesh.start()
            self._write_dial_configs(self.mesh)
        for a in self.config["cluster"]["agents"]:
            self.agents[a["id"]] = AgentProcess(
                id=a["id"],
                region=a["region"],
                http=a["http"],
                raft=a["raft"],
                data_dir=self.workdir / "data" / a["id"],
                log_path=self.workdir / f"{a['id']}.log",
                scheme=self.scheme,
            )
        if agents:
            for agent_id in self.agents:
                self.start_agent(agent_id)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def client_ssl(self) -> ssl.SSLContext | None:
        """A client context for these agents: their CA, and the client certificate; None without TLS."""
        if self.tls is None:
            return None
        return client_context(self.tls.ca_file, self.tls.client.cert_file, self.tls.client.key_file)

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
        for proxies in self.target_proxies.values():
            for proxy in proxies:
                with contextlib.suppress(Exception):
                    await proxy.stop()
        self.target_proxies.clear()
        for backend in self.backends.values():
            with contextlib.suppress(Exception):
                await backend.stop()
        self.backends.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_workdir and self.workdir is not None and not os.environ.get("CONTROLPLANE_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        # The ports `remap_ports` reserved for this cluster (others are not held: ignored).
        release(int(p) for p in re.findall(r":(\d{2,5})\b", json.dumps(self.config)))

    async def start_backends(self) -> None:
        for region, rc in self.config["regions"].items():
            for service, sc in rc["services"].items():
                host, port = _split(service_address(sc))
                backend = SimBackend(region, service, host=host, port=port, admin_port=None)
                await backend.start()
                self.backends[(region, service)] = backend

    async def _start_observer_paths(self) -> None:
        """Per-agent configs whose targets for some regions go through a proxy of their own."""
        assert self.workdir is not None
        agent_ids = {a["id"] for a in self.config["cluster"]["agents"]}
        for agent_id, regions in self.observer_paths.items():
            if agent_id not in agent_ids:
                raise ValueError(f"observer_paths: unknown agent {agent_id!r} (agents: {sorted(agent_ids)})")
            config: dict[str, Any] = json.loads(json.dumps(self.config))
            for region in regions:
                if region not in config["regions"]:
                    raise ValueError(f"observer_paths.{agent_id}: unknown region {region!r}")
                proxies = self.target_proxies.setdefault((agent_id, region), [])
                for svc in config["regions"][region]["services"].values():
                    targets = []
                    for t in svc["targets"]:
                        url = _url_of(t)
                        if url is None:
                            targets.append(t)  # a prometheus probe does not reach the backend
                            continue
                        host, port = _split(_hostport(url))
                        # A fixed port, so that a proxy stopped to refuse can listen again.
                        taken = {*_config_ports(self.config), *(q.port for q in self._all_target_proxies())}
                        proxy = FaultProxy(host, free_port(host, exclude=taken), host, port)
                        await proxy.start()
                        proxies.append(proxy)
                        new_url = _with_port(url, proxy.port)
                        targets.append(new_url if isinstance(t, str) else {**t, "url": new_url})
                    svc["targets"] = targets
            path = self.workdir / f"cluster-{agent_id}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            self.agent_config_paths[agent_id] = path

    def _write_dial_configs(self, mesh: ProxyMesh) -> None:
        """Per-agent configs whose `cluster.dial` sends this agent's Raft traffic through the mesh."""
        assert self.workdir is not None and self.config_path is not None
        for a in self.config["cluster"]["agents"]:
            agent_id = a["id"]
            source = self.agent_config_paths.get(agent_id, self.config_path)
            config = yaml.safe_load(source.read_text(encoding="utf-8"))
            config["cluster"]["dial"] = mesh.dial_map(agent_id)
            path = self.workdir / f"cluster-{agent_id}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            self.agent_config_paths[agent_id] = path

    async def cut_observer(self, agent_id: str, region: str, mode: ObserverFault = "refuse") -> None:
        """Cut `agent_id`'s own path to `region` (listed in `observer_paths`).

        `refuse`: nothing listens any more (connect refused, for HTTP and TCP probes alike);
        `reset`: connections are accepted and reset; `blackhole`: accepted and never answered.
        """
        proxies = self._target_proxies_of(agent_id, region)
        for proxy in proxies:
            if mode == "refuse":
                await proxy.stop()
            else:
                proxy.partition(mode)

    async def heal_observer(self, agent_id: str, region: str) -> None:
        for proxy in self._target_proxies_of(agent_id, region):
            proxy.heal()
            with contextlib.suppress(RuntimeError):  # still listening: it was not refusing
                await proxy.start()

    def _all_target_proxies(self) -> list[FaultProxy]:
        return [proxy for proxies in self.target_proxies.values() for proxy in proxies]

    def _target_proxies_of(self, agent_id: str, region: str) -> list[FaultProxy]:
        try:
            return self.target_proxies[(agent_id, region)]
        except KeyError:
            raise KeyError(f"{agent_id} probes {region} directly; see observer_paths") from None

    # -- agents ------------------------------------------------------------------------

    def env_for(self, agent_id: str) -> dict[str, str]:
        env = {
            **os.environ,
            "CONTROLPLANE_CLUSTER_SECRET": self.cluster_secret,
            "CONTROLPLANE_ADMIN_TOKEN": self.admin_token,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        return env

    def start_agent(self, agent_id: str, extra_env: Mapping[str, str] | None = None) -> AgentProcess:
        a = self.agents[agent_id]
        if a.alive:
            raise RuntimeError(f"{agent_id} is already running")
        config_path = self.agent_config_paths.get(agent_id, self.config_path)
        assert config_path is not None
        log = a.log_path.open("ab")
        try:
            a.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controlplane",
                    "agent",
                    "-c",
                    str(config_path),
                    "--id",
                    agent_id,
                    "--data-dir",
                    str(a.data_dir),
                    # If this process dies without stopping them (SIGKILL, a crash), the
                    # agents stop too instead of holding the ports.
                    "--exit-with-parent",
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

    async def stop_agent(
        self, agent_id: str, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0
    ) -> int | None:
        """Signal `agent_id` and wait (without blocking the loop) for it to exit.

        Returns the exit code (negative: killed by that signal), None if it was not
        running; raises TimeoutError if it is still running after `timeout_s`.
        """
        a = self.agents[agent_id]
        proc = a.proc
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        self.kill_agent(agent_id, sig, wait=False)
        try:
            return await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{agent_id} still running {timeout_s:g} s after {sig.name}") from None

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

    def check_alive(self, agent_ids: Iterable[str]) -> None:
        for i in agent_ids:
            a = self.agents[i]
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"agent {i} exited with {a.proc.returncode}:\n{self.log_of(i)[-3000:]}")
