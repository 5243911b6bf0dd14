"""Clusters of real nodes on loopback for the tests: in this process, or one process each.

Everything started here is stopped in `close()` (tests use them as context managers or
fixtures), by PID for processes, even when the test fails. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from controlplane.raft.node import RaftNode
from controlplane.raft.settings import RaftLimits, RaftTimings
from controlplane.testing.ports import free_port

SECRET = b"test-cluster-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]

# Generous for a shared 2-core machine, still quick.
FAST = RaftTimings(
    election_timeout_min_s=0.3,
    election_timeout_max_s=0.6,
    heartbeat_s=0.05,
    idle_timeout_s=2.0,
    keepalive_s=0.3,
    commit_timeout_s=5.0,
)

T = TypeVar("T")


def wait_for(what: str, pred: Callable[[], T], timeout_s: float = 10.0, every_s: float = 0.01) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


class ListSM:
    """A state machine that keeps every applied payload (thread-safe reads)."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.ctimes: list[float] = []  # of the entries applied since start (not restored)
        self.ever_applied: list[bytes] = []  # every apply since start, never reset by restore
        self.lock = threading.Lock()

    def apply(self, index: int, term: int, ctime: float, data: bytes) -> object:
        with self.lock:
            self.items.append(data)
            self.ctimes.append(ctime)
            self.ever_applied.append(data)
            return len(self.items)

    def snapshot(self) -> bytes:
        with self.lock:
            return b"\n".join(self.items)

    def restore(self, data: bytes) -> None:
        with self.lock:
            self.items = data.split(b"\n") if data else []


@dataclass
class LocalCluster:
    """Nodes in this process (each on its own engine thread)."""

    root: Path
    ids: tuple[str, ...] = ("a", "b", "c")
    timings: RaftTimings = FAST
    limits: RaftLimits = field(default_factory=RaftLimits)
    secrets: dict[str, bytes] = field(default_factory=dict)
    dial: dict[str, dict[str, str]] = field(default_factory=dict)
    data_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.peers = {i: f"127.0.0.1:{free_port()}" for i in self.ids}
        self.nodes: dict[str, RaftNode] = {}
        self.sms: dict[str, ListSM] = {}

    def start(self, node_id: str) -> RaftNode:
        sm = ListSM()
        node = RaftNode(
            node_id,
            self.peers,
            self.secrets.get(node_id, SECRET),
            self.data_dirs.get(node_id, self.root / node_id),
            sm,
            timings=self.timings,
            limits=self.limits,
            dial=self.dial.get(node_id),
        )
        node.start()
        self.nodes[node_id], self.sms[node_id] = node, sm
        return node

    def start_all(self) -> LocalCluster:
        for i in self.ids:
            self.start(i)
        return self

    def stop(self, node_id: str, transfer: bool = False) -> None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            node.stop(transfer_leadership=transfer)

    def close(self) -> None:
        for i in list(self.nodes):
            self.stop(i)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leader(self, timeout_s: float = 10.0) -> str:
        def one() -> str | None:
            sts = [n.status() for n in self.nodes.values()]
            leaders = [st.id for st in sts if st.role == "leader"]
            # ... and every running node knows it.
            if len(leaders) == 1 and all(st.leader == leaders[0] for st in sts):
                return leaders[0]
            return None

        return wait_for("one leader that everyone follows", one, timeout_s)


@dataclass
class Proc:
    id: str
    http_port: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 15.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def status(self) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", "/status", timeout_s=2.0))
        except (OSError, ValueError):
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class ProcCluster:
    """One `tests/raft/kvnode.py` process per node."""

    def __init__(
        self,
        root: Path,
        ids: tuple[str, ...] = ("a", "b", "c"),
        timings: RaftTimings = FAST,
        limits: dict[str, int] | None = None,
        dial: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ids = ids
        self.timings = timings
        self.limits = limits or {}
        self.dial = dial or {}
        self.peers = {i: f"127.0.0.1:{free_port()}" for i in ids}
        self.procs: dict[str, Proc] = {}
        self.starts: dict[str, int] = {}

    def start(self, node_id: str, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> Proc:
        port = free_port()
        n = self.starts[node_id] = self.starts.get(node_id, 0) + 1
        log_path = self.root / f"{node_id}.{n}.log"
        cmd = [
            *(prefix or []),
            sys.executable,
            "-m",
            "tests.raft.kvnode",
            "--id",
            node_id,
            "--peers",
            json.dumps(self.peers),
            "--dial",
            json.dumps(self.dial.get(node_id, {})),
            "--data-dir",
            str(self.root / node_id),
            "--http-port",
            str(port),
            "--timings",
            json.dumps(asdict(self.timings)),
            "--limits",
            json.dumps(self.limits),
        ]
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, **(env or {}), "RAFT_SECRET": SECRET.decode(), "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        proc = Proc(node_id, port, popen, log_path)
        self.procs[node_id] = proc
        assert popen.stdout is not None
        line = popen.stdout.readline()
        if b"READY" not in line:
            raise AssertionError(f"{node_id} did not start: {proc.log_text()[-2000:]}")
        wait_for(f"{node_id} http", proc.status, 10)
        return proc

    def start_all(self) -> ProcCluster:
        for i in self.ids:
            self.start(i)
        return self

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(node_id)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)
        proc.popen.wait(10)

    def close(self) -> None:
        for node_id in list(self.procs):
            proc = self.procs[node_id]
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                try:
                    proc.popen.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.popen.pid, signal.SIGKILL)
                    proc.popen.wait(5)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        self.procs.clear()

    def __enter__(self) -> ProcCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {i: p.status() for i, p in self.procs.items()}

    def leader(self, timeout_s: float = 10.0, among: tuple[str, ...] | None = None) -> str:
        def one() -> str | None:
            sts = {i: s for i, s in self.statuses().items() if among is None or i in among}
            leaders = [i for i, s in sts.items() if s and s["role"] == "leader"]
            return leaders[0] if len(leaders) == 1 else None

        return wait_for("one leader", one, timeout_s, every_s=0.02)


@contextlib.contextmanager
def proc_cluster(root: Path, **kwargs: Any) -> Iterator[ProcCluster]:
    cluster = ProcCluster(root, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()


class MeshThread:
    """A `ProxyMesh` (the project's TCP fault proxy) on an event loop in its own thread."""

    def __init__(self, members: dict[str, str]) -> None:
        try:
            from controlplane.testing.faultproxy import ProxyMesh  # type: ignore[import-not-found]
        except ImportError:
            from controlplane.faultproxy import ProxyMesh
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-mesh", daemon=True)
        self.thread.start()
        self.mesh = ProxyMesh(members)
        self.call(self.mesh.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def do(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            self.call(self.mesh.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
