"""One throwaway Prometheus on loopback, scraping simulated backends, for tests and the demo.

`LocalPrometheus` runs Debian's `prometheus` binary (package `prometheus`, 2.42 here)
with a generated configuration: one scrape job per service, one static target per
(region, service) carrying `region` and `service` labels, scraped every
`scrape_interval_s` (0.5 s by default: probes see a change within a second or two). The
data directory is a temporary one. What it guarantees:

- `start()` returns once Prometheus answers `/-/ready` (its first scrapes follow about
  5 s later: Prometheus hands targets to the scrapers on a fixed 5 s tick; use
  `wait_for_series`), or raises
  `PrometheusUnavailable` with the end of its log; a missing binary is reported naming
  the Debian package, never silently skipped.
- The port is chosen once, so `stop()` then `start()` is the same Prometheus on the same
  address again (its TSDB kept), which is what "Prometheus went away and came back" needs.
- The process is always stopped and the temporary directory removed: by `close()`, by
  `async with`, or at the latest when the interpreter exits. Only the process this
  object started is ever signalled. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import yaml

from controlplane.errors import ControlplaneError
from controlplane.testing.ports import free_port

DEBIAN_PACKAGE = "prometheus"
_STOP_GRACE_S = 5.0
_LOG_TAIL_CHARS = 2000


class PrometheusUnavailable(ControlplaneError):
    """Prometheus could not be found or started; `detail` says what to do or what it logged."""

    code = "prometheus_unavailable"

    def __str__(self) -> str:
        return f"{self.message}\n{self.detail}" if self.detail else self.message


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One thing to scrape: `host:port` (its `/metrics`), labelled with region and service."""

    region: str
    service: str
    address: str


def find_binary(name: str = "prometheus") -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if pathlib.Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise PrometheusUnavailable(
            f"the Prometheus binary {name!r} is not on PATH: install Debian's {DEBIAN_PACKAGE} package",
            f"apt-get install -y {DEBIAN_PACKAGE}",
        )
    return path


def _cleanup(proc_box: list[subprocess.Popen[bytes]], root: pathlib.Path | None) -> None:
    for proc in proc_box:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_STOP_GRACE_S)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


class LocalPrometheus:
    """A Prometheus on 127.0.0.1 scraping `targets` (see the module docstring)."""

    def __init__(
        self,
        targets: Iterable[ScrapeTarget],
        *,
        scrape_interval_s: float = 0.5,
        port: int | None = None,
        binary: str = "prometheus",
        start_timeout_s: float = 30.0,
    ) -> None:
        self.targets = tuple(targets)
        self.scrape_interval_s = scrape_interval_s
        self.port = port or 0
        self.start_timeout_s = start_timeout_s
        self._binary = binary
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="controlplane-prometheus-"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self.root)
        atexit.register(self._finalizer)

    @property
    def url(self) -> str:
        if not self.port:
            raise PrometheusUnavailable("Prometheus has not been started, so it has no address yet")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> pathlib.Path:
        return self.root / "prometheus.log"

    @property
    def running(self) -> bool:
        return bool(self._procs) and self._procs[-1].poll() is None

    def config(self) -> dict[str, object]:
        interval = f"{round(self.scrape_interval_s * 1000)}ms"
        jobs: dict[str, list[ScrapeTarget]] = {}
        for t in self.targets:
            jobs.setdefault(t.service, []).append(t)
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": service,
                    "static_configs": [
                        {"targets": [t.address], "labels": {"region": t.region, "service": t.service}}
                        for t in targets
                    ],
                }
                for service, targets in jobs.items()
            ],
        }

    async def start(self) -> LocalPrometheus:
        """Start Prometheus (again, on the same port and data) and wait until it is ready."""
        if self._closed:
            raise PrometheusUnavailable("this LocalPrometheus was closed; make a new one")
        if self.running:
            return self
        if not self.port:
            self.port = free_port()
        proc = self._spawn(find_binary(self._binary))
        try:
            await self._wait_ready(proc)
        except BaseException:
            await self.stop()
            raise
        return self

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        """Start the process (fast; the wait for readiness is separate and async)."""
        config_file = self.root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")
        args = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
            # Nothing about this instance is worth keeping: small and quick.
            "--storage.tsdb.retention.time=1h",
        ]
        with self.log_file.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._procs[:] = [proc]
        return proc

    async def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                if proc.poll() is not None:
                    raise PrometheusUnavailable(
                        f"prometheus exited during start (code {proc.returncode})", self._log_tail()
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{self.url}/-/ready") as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise PrometheusUnavailable(
                        f"prometheus was not ready within {self.start_timeout_s:g} s", self._log_tail()
                    )
                await asyncio.sleep(0.1)

    async def wait_for_series(self, query: str, count: int, timeout_s: float = 30.0) -> None:
        """Until `query` returns at least `count` series (every target scraped once, say)."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                    async with session.post(f"{self.url}/api/v1/query", data={"query": query}) as r:
                        body = await r.json()
                        if len(body.get("data", {}).get("result", [])) >= count:
                            return
                if time.monotonic() > deadline:
                    raise PrometheusUnavailable(
                        f"{query!r} did not return {count} series within {timeout_s:g} s", self._log_tail()
                    )
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; the port and data stay for `start()`."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                if not await _wait_exit(proc, _STOP_GRACE_S):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await _wait_exit(proc, _STOP_GRACE_S)

    def pause(self) -> None:
        """SIGSTOP: it keeps its port and answers nothing (a hung Prometheus)."""
        if self.running:
            self._procs[-1].send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self._procs[-1].send_signal(signal.SIGCONT)

    async def close(self) -> None:
        if self._closed:
            return
        await self.stop()
        self._closed = True
        self._finalizer()
        atexit.unregister(self._finalizer)

    async def __aenter__(self) -> LocalPrometheus:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no prometheus log)"


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
