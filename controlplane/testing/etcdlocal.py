"""One throwaway etcd on loopback, for tests, `controlplane demo --backend etcd` and benches.

`LocalEtcd` runs the Debian `etcd` binary (package `etcd-server`) as a single-member
cluster listening on 127.0.0.1 only, with its data in a temporary directory and client
and peer ports that were free when it started. What it guarantees:

- `start()` returns once etcd answers its `/health` endpoint, or raises
  `EtcdUnavailable` with the end of etcd's log; a missing binary is reported naming the
  package to install, never silently skipped.
- The ports and the data directory are chosen once: `kill()` then `start()` is a real
  restart of the same member with the same data on the same addresses, which is what a
  fault test needs.
- With `tls`, etcd serves clients over HTTPS and requires a client certificate signed by
  the given CA (the peer URL stays plain: there are no peers).
- `pause()` and `resume()` send SIGSTOP and SIGCONT: the process keeps its sockets, so
  clients see requests hang rather than connections refused, as with a stuck server.
- The process is always stopped and the temporary directory removed: by `close()`, by
  `async with`, or at the latest when the interpreter exits. Only the process this
  object started is ever signalled.

Nothing here blocks the event loop for long: the process is spawned with `Popen`
(fast) and waited on by polling, so a `LocalEtcd` is not tied to one event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import pathlib
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from controlplane.errors import ControlplaneError
from controlplane.testing.ports import free_port

DEBIAN_PACKAGE = "etcd-server"

_HEALTH_POLL_S = 0.05
_HEALTH_REQUEST_TIMEOUT_S = 1.0
_STOP_GRACE_S = 5.0
_PORT_ATTEMPTS = 3
_LOG_TAIL_CHARS = 2000


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LocalEtcdTls:
    """Certificates for an etcd that serves clients over TLS and checks theirs.

    `cert_file`/`key_file` are the server's (valid for 127.0.0.1), `ca_file` signed the
    clients' certificates, and `client_cert_file`/`client_key_file` are a client pair that
    `healthy()` presents.
    """

    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path
    client_cert_file: pathlib.Path
    client_key_file: pathlib.Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return context


def _run_in_thread(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to completion on a fresh event loop in a worker thread.

    For callers without an event loop of their own, or inside one they must not nest
    `asyncio.run` into (a test session fixture, a benchmark's set-up).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = asyncio.run(work)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="local-etcd", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


class EtcdUnavailable(ControlplaneError):
    """etcd could not be found or started; `detail` says what to do or what it logged."""

    code = "etcd_unavailable"

    def __str__(self) -> str:
        # Shown whole in tracebacks and test summaries: the detail is the useful part.
        return f"{self.message}\n{self.detail}" if self.detail else self.message


def find_binary(name: str = "etcd") -> str:
    """The path of the etcd server binary; `EtcdUnavailable` naming the package if absent."""
    path = shutil.which(name)
    if path is None:
        raise EtcdUnavailable(
            f"the etcd server binary {name!r} is not on PATH: install Debian's {DEBIAN_PACKAGE} package",
            f"apt-get install -y {DEBIAN_PACKAGE} etcd-client",
        )
    return path


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (finalizer, atexit): SIGKILL works on a stopped process too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE_S)


def _cleanup(proc_box: list[subprocess.Popen[bytes]], root: pathlib.Path | None) -> None:
    for proc in proc_box:
        _kill_quietly(proc)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


class LocalEtcd:
    """A single etcd member on 127.0.0.1 (see the module docstring).

    `root` is where the data directory and the log go; when not given a temporary
    directory is made and removed again by `close()`. Ports left as None are picked
    free at the first `start()` and kept for later restarts.
    """

    def __init__(
        self,
        root: pathlib.Path | None = None,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "controlplane",
        binary: str = "etcd",
        start_timeout_s: float = 20.0,
        extra_args: tuple[str, ...] = (),
        tls: LocalEtcdTls | None = None,
    ) -> None:
        self.name = name
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args
        self._binary = binary
        self._own_root = root is None
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="controlplane-etcd-")) if root is None else root
        self._fixed_ports = client_port is not None or peer_port is not None
        self.client_port = client_port or 0
        self.peer_port = peer_port or 0
        # The live process, boxed so the finalizer sees replacements without holding `self`.
        self._procs: list[subprocess.Popen[bytes]] = []
        self._paused = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self.root if self._own_root else None)
        atexit.register(self._finalizer)

    # -- addresses -----------------------------------------------------------------------

    @property
    def data_dir(self) -> pathlib.Path:
        return self.root / "data"

    @property
    def log_file(self) -> pathlib.Path:
        return self.root / "etcd.log"

    @property
    def endpoint(self) -> str:
        """`http(s)://127.0.0.1:PORT`, the client URL (valid once started)."""
        if not self.client_port:
            raise EtcdUnavailable("etcd has not been started, so it has no endpoint yet")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def _proc(self) -> subprocess.Popen[bytes] | None:
        return self._procs[-1] if self._procs else None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> LocalEtcd:
        """Start etcd (again, on the same data and ports) and wait until it is healthy."""
        if self._closed:
            raise EtcdUnavailable("this LocalEtcd was closed; make a new one")
        if self.running:
            return self
        binary = find_binary(self._binary)
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            if not self.client_port or (not self._fixed_ports and attempt > 0):
                self.client_port, self.peer_port = free_port(), free_port()
            self._spawn(binary)
            try:
                await self._wait_healthy()
                return self
            except EtcdUnavailable:
                await self.kill()
                in_use = "address already in use" in self._log_tail()
                if self._fixed_ports or not in_use or attempt == _PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, binary: str) -> None:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls_args: list[str] = []
        if self.tls is not None:
            tls_args = [
                "--cert-file",
                str(self.tls.cert_file),
                "--key-file",
                str(self.tls.key_file),
                "--client-cert-auth",
                "--trusted-ca-file",
                str(self.tls.ca_file),
            ]
        args = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            "warn",
            *tls_args,
            *self.extra_args,
        ]
        with self.log_file.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C meant for the test runner is not also
                # delivered to etcd, which is stopped in order by close().
                start_new_session=True,
            )
        self._procs[:] = [proc]
        self._paused = False

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise EtcdUnavailable(f"etcd exited during start (code {code})", self._log_tail())
            if await self.healthy():
                return
            if time.monotonic() > deadline:
                raise EtcdUnavailable(
                    f"etcd was not healthy within {self.start_timeout_s:g} s", self._log_tail()
                )
            await asyncio.sleep(_HEALTH_POLL_S)

    async def healthy(self) -> bool:
        """True when etcd's `/health` says so (a stopped or paused etcd is not healthy)."""
        if not self.client_port:
            return False
        try:
            async with asyncio.timeout(_HEALTH_REQUEST_TIMEOUT_S):
                context = self.tls.client_context() if self.tls is not None else None
                reader, writer = await asyncio.open_connection("127.0.0.1", self.client_port, ssl=context)
                try:
                    writer.write(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    await writer.drain()
                    response = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            return False
        return b" 200 " in response.split(b"\r\n", 1)[0] and b'"health":"true"' in response

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): it keeps its sockets open and answers nothing."""
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused etcd run again (SIGCONT)."""
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    async def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed beyond what etcd already synced."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await self._wait_exit(proc, _STOP_GRACE_S)
        self._paused = False

    async def stop(self) -> None:
        """Stop etcd cleanly (SIGTERM, then SIGKILL after a grace period)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self._paused:
                    proc.send_signal(signal.SIGCONT)
                proc.terminate()
            if not await self._wait_exit(proc, _STOP_GRACE_S):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await self._wait_exit(proc, _STOP_GRACE_S)
        self._paused = False

    async def restart(self) -> None:
        """Kill and start again on the same data directory and ports."""
        await self.kill()
        await self.start()

    async def close(self) -> None:
        """Stop etcd and remove the temporary directory (if this object made it)."""
        if self._closed:
            return
        await self.stop()
        self._closed = True
        self._finalizer()
        atexit.unregister(self._finalizer)

    def start_blocking(self) -> LocalEtcd:
        """`start()` for callers that are not in an event loop (or must not block theirs)."""
        return _run_in_thread(self.start())

    def close_blocking(self) -> None:
        """`close()` for callers that are not in an event loop."""
        _run_in_thread(self.close())

    async def __aenter__(self) -> LocalEtcd:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- helpers -------------------------------------------------------------------------

    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EtcdUnavailable("etcd is not running")
        return proc

    @staticmethod
    async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no etcd log)"
        return text[-_LOG_TAIL_CHARS:]

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"LocalEtcd({self.endpoint if self.client_port else 'unstarted'}, {state}, pid={self.pid})"
