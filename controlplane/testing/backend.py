"""A region's service, simulated: an HTTP server whose failures can be switched on and off.

The demo and the acceptance tests need something real to probe and to route traffic
to, that can fail the ways production services fail: answer 503 (unhealthy), answer
slowly (added latency, the gray failure of the incident this product comes from),
report high utilization, accept connections and never answer (blackhole: only a
timeout tells), refuse connections (the process is gone), or flap.

`SimBackend` serves, on its data port:

- `GET /healthz`: 200 with `{"region", "service", "utilization"}` when healthy, 503 when
  not;
- `GET /metrics`: Prometheus metrics, as an instrumented application exposes them (see
  `SimMetrics`): request counters by status code and a latency histogram fed by
  simulated traffic at `SIMULATED_RPS` with the configured `error_ratio` (every request
  fails while unhealthy) and `latency_ms`, and memory used / limit from `utilization`.
  It is served like any other path, so refusing or black-holing the backend stops its
  scrapes too (Prometheus then records `up == 0`);
- every other path and method: "application traffic", 200 with the text
  `region=<r> service=<s>` and headers `X-Region`/`X-Service` when healthy, 503 when not,
  counted in `requests` (and `errors` for the 503s).

It is controlled in-process (`set_state`) or, for a backend in another process, over an
admin API on its own port, which no fault mode touches:

- `POST /admin/state` with any of `{"healthy": bool, "latency_ms": n, "utilization": x,
  "error_ratio": x, "mode": "normal" | "blackhole" | "refuse", "flap_period_s": s}`;
  answers with the stats;
- `GET /admin/stats`: the state and the request counters.

`python -m controlplane.testing.backend --spec FILE` runs several backends in one process
(the spec is YAML or JSON, see `load_specs`), prints one JSON line with their ports when
they are listening, and runs until SIGINT or SIGTERM.

Everything is bounded: held (blackholed) requests end when their client disconnects,
the mode changes, or the backend stops; `stop()` closes every socket and task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import orjson
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

Mode = Literal["normal", "blackhole", "refuse"]
MODES: tuple[str, ...] = get_args(Mode)

# Above this the "latency" would just be a blackhole with extra steps.
MAX_LATENCY_MS = 600_000
_ADMIN_MAX_BODY = 64 * 1024
_STATE_KEYS = frozenset({"healthy", "latency_ms", "utilization", "error_ratio", "mode", "flap_period_s"})
# Simulated traffic behind the metrics: enough for a rate() over a few seconds to be smooth.
SIMULATED_RPS = 200.0
MEMORY_LIMIT_BYTES = 1 << 30
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class SimBackend:
    """One simulated (region, service). `port=0` / `admin_port=0` pick free ports;
    `admin_port=None` serves no admin API."""

    def __init__(
        self,
        region: str,
        service: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        admin_port: int | None = 0,
        admin_host: str | None = None,
    ) -> None:
        self.region = region
        self.service = service
        self.host = host
        self._requested_port = port
        self._requested_admin_port = admin_port
        self.admin_host = admin_host or host
        self.healthy = True
        self.latency_ms = 0.0
        self.utilization = 0.0
        self.error_ratio = 0.0
        self.mode: Mode = "normal"
        self.flap_period_s: float | None = None
        self.requests = 0
        self.errors = 0
        self.health_checks = 0
        self.metrics = SimMetrics(self)
        self._port: int | None = None
        self._admin_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._admin_runner: web.AppRunner | None = None
        self._flap_task: asyncio.Task[None] | None = None
        # Set while requests may be answered; blackholed requests wait on it.
        self._open = asyncio.Event()
        self._open.set()
        self._stopping = False
        self._lock = asyncio.Lock()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("backend not started")
        return self._port

    @property
    def admin_port(self) -> int:
        if self._admin_port is None:
            raise RuntimeError("backend not started or has no admin API")
        return self._admin_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("backend already started")
        self._stopping = False
        if self.mode == "blackhole":
            self._open.clear()
        else:
            self._open.set()
        try:
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/metrics", self._metrics)
            app.router.add_route("*", "/{tail:.*}", self._traffic)
            # handler_cancellation: a client that gives up on a blackholed request
            # cancels its handler, so held requests cannot pile up.
            self._runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await self._runner.setup()
            sock = _listen(self.host, self._requested_port)
            self._port = sock.getsockname()[1]
            if self.mode == "refuse":
                sock.close()
            else:
                await self._open_site(sock)
            if self._requested_admin_port is not None:
                admin = web.Application(client_max_size=_ADMIN_MAX_BODY)
                admin.router.add_post("/admin/state", self._admin_state)
                admin.router.add_get("/admin/stats", self._admin_stats)
                self._admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
                await self._admin_runner.setup()
                admin_sock = _listen(self.admin_host, self._requested_admin_port)
                self._admin_port = admin_sock.getsockname()[1]
                await web.SockSite(self._admin_runner, admin_sock).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close both ports, release held requests and end the flapping task."""
        self._stopping = True
        self._open.set()
        await self._stop_flapping()
        for runner in (self._runner, self._admin_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._admin_runner = self._site = None

    async def __aenter__(self) -> SimBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _open_site(self, sock: socket.socket | None = None) -> None:
        if self._runner is None:
            raise RuntimeError("backend not started")
        site = web.SockSite(self._runner, sock or _listen(self.host, self.port))
        await site.start()
        self._site = site

    async def _close_site(self) -> None:
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()
        # Kept-alive connections would keep being served; a dead process has none.
        server = self._runner.server if self._runner is not None else None
        for connection in server.connections if server is not None else ():
            connection.force_close()

    # -- control ---------------------------------------------------------------------

    async def set_state(
        self,
        *,
        healthy: bool | None = None,
        latency_ms: float | None = None,
        utilization: float | None = None,
        error_ratio: float | None = None,
        mode: Mode | None = None,
        flap_period_s: float | None = None,
    ) -> None:
        """Change what is given; leave the rest.

        Setting `healthy` stops any flapping. `flap_period_s > 0` (re)starts flapping:
        health toggles at once and then every that many seconds; `flap_period_s = 0`
        stops it and leaves the backend healthy unless `healthy` says otherwise.
        """
        async with self._lock:
            # Traffic so far was simulated with the old state.
            self.metrics.advance()
            if error_ratio is not None:
                self.error_ratio = min(max(float(error_ratio), 0.0), 1.0)
            if latency_ms is not None:
                self.latency_ms = float(latency_ms)
            if utilization is not None:
                self.utilization = float(utilization)
            if healthy is not None:
                await self._stop_flapping()
                self.healthy = healthy
            if flap_period_s is not None:
                await self._stop_flapping()
                if healthy is None:
                    self.healthy = True
                if flap_period_s > 0:
                    self.flap_period_s = flap_period_s
                    self._flap_task = asyncio.create_task(
                        self._flap(flap_period_s), name=f"flap {self.region}/{self.service}"
                    )
            if mode is not None and mode != self.mode:
                await self._set_mode(mode)

    async def _set_mode(self, mode: Mode) -> None:
        previous, self.mode = self.mode, mode
        if mode == "blackhole":
            self._open.clear()
        if self._runner is not None:
            if mode == "refuse":
                await self._close_site()
            elif previous == "refuse":
                await self._open_site()
        # Released only now, so requests held by a blackhole that turns into a refusal
        # are cut with their connections rather than answered.
        if mode != "blackhole":
            self._open.set()

    async def _flap(self, period_s: float) -> None:
        while True:
            self.healthy = not self.healthy
            await asyncio.sleep(period_s)

    async def _stop_flapping(self) -> None:
        self.flap_period_s = None
        if self._flap_task is not None:
            task, self._flap_task = self._flap_task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stats(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "service": self.service,
            "port": self._port,
            "healthy": self.healthy,
            "mode": self.mode,
            "latency_ms": self.latency_ms,
            "utilization": self.utilization,
            "error_ratio": self.error_ratio,
            "flap_period_s": self.flap_period_s,
            "requests": self.requests,
            "errors": self.errors,
            "health_checks": self.health_checks,
        }

    # -- data plane ------------------------------------------------------------------

    async def _answerable(self) -> None:
        """Hold the request while blackholed, then add the configured latency."""
        await self._open.wait()
        if self._stopping:
            raise web.HTTPServiceUnavailable(text="stopping\n")
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000.0)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        await self._answerable()
        if not self.healthy:
            return web.json_response(
                {"region": self.region, "service": self.service, "healthy": False}, status=503
            )
        return web.json_response(
            {"region": self.region, "service": self.service, "utilization": self.utilization}
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        await self._answerable()
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _traffic(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await self._answerable()
        headers = {"X-Region": self.region, "X-Service": self.service}
        if not self.healthy:
            self.errors += 1
            text = f"region={self.region} service={self.service} unavailable\n"
            return web.Response(status=503, text=text, headers=headers)
        return web.Response(text=f"region={self.region} service={self.service}\n", headers=headers)

    # -- admin API -------------------------------------------------------------------

    async def _admin_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.stats())

    async def _admin_state(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "bad_request", "detail": "body is not JSON"}, status=400)
        try:
            changes = parse_state(body)
        except ValueError as exc:
            return _json({"error": "bad_request", "detail": str(exc)}, status=400)
        await self.set_state(**changes)
        return _json(self.stats())


class SimMetrics(Collector):
    """What an instrumented application would expose, for one simulated backend.

    Simulated traffic runs at `SIMULATED_RPS` whenever the backend is not refusing: its
    requests are integrated lazily (at each scrape and each state change) into
    `http_requests_total{code="200"|"503"}` (with the `error_ratio`, or all failing while
    unhealthy) and `http_request_duration_seconds` (every request at `latency_ms`). Real
    requests to the backend are counted as well. Memory is `utilization` of a 1 GiB limit:
    `process_resident_memory_bytes / process_memory_limit_bytes` is the utilization.
    `clock` is monotonic seconds.
    """

    def __init__(self, backend: SimBackend, clock: Any = time.monotonic) -> None:
        self._backend = backend
        self._clock = clock
        self._last = clock()
        self.ok = 0.0
        self.failed = 0.0
        self._buckets = [0.0] * len(LATENCY_BUCKETS_S)
        self._count = 0.0
        self._sum_s = 0.0
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def advance(self) -> None:
        """Account for the simulated traffic since the last call, at the current state."""
        now = self._clock()
        elapsed, self._last = max(0.0, now - self._last), now
        b = self._backend
        if b.mode == "refuse":
            return
        n = SIMULATED_RPS * elapsed
        failing = 1.0 if not b.healthy else b.error_ratio
        self.failed += n * failing
        self.ok += n * (1.0 - failing)
        latency_s = b.latency_ms / 1000.0
        for i, le in enumerate(LATENCY_BUCKETS_S):
            if latency_s <= le:
                self._buckets[i] += n
        self._count += n
        self._sum_s += n * latency_s

    def collect(self) -> Iterator[Any]:
        self.advance()
        b = self._backend
        requests = CounterMetricFamily("http_requests", "Requests answered, by status code", labels=["code"])
        requests.add_metric(["200"], self.ok + (b.requests - b.errors))
        requests.add_metric(["503"], self.failed + b.errors)
        yield requests
        cumulative = [(str(le), value) for le, value in zip(LATENCY_BUCKETS_S, self._buckets, strict=True)]
        yield HistogramMetricFamily(
            "http_request_duration_seconds",
            "Request latency",
            buckets=[*cumulative, ("+Inf", self._count)],
            sum_value=self._sum_s,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Memory in use", value=b.utilization * MEMORY_LIMIT_BYTES
        )
        yield GaugeMetricFamily("process_memory_limit_bytes", "Memory limit", value=float(MEMORY_LIMIT_BYTES))

    def exposition(self) -> bytes:
        return generate_latest(self._registry)


def parse_state(body: object) -> dict[str, Any]:
    """Validate an admin state body into `set_state` keyword arguments."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = sorted(set(body) - _STATE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {sorted(_STATE_KEYS)}")
    out: dict[str, Any] = {}
    if "healthy" in body:
        if not isinstance(body["healthy"], bool):
            raise ValueError(f"healthy must be true or false (got {body['healthy']!r})")
        out["healthy"] = body["healthy"]
    limits = (
        ("latency_ms", MAX_LATENCY_MS),
        ("utilization", 10.0),
        ("error_ratio", 1.0),
        ("flap_period_s", 3600.0),
    )
    for key, upper in limits:
        if key in body:
            value = body[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 <= value <= upper
            ):
                raise ValueError(f"{key} must be a number from 0 to {upper} (got {value!r})")
            out[key] = float(value)
    if "mode" in body:
        if body["mode"] not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)} (got {body['mode']!r})")
        out["mode"] = cast(Mode, body["mode"])
    return out


def _json(data: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- several backends in one process ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend of a multi-backend process. Ports 0 mean any free port."""

    region: str
    service: str
    port: int = 0
    admin_port: int = 0
    host: str = "127.0.0.1"


def load_specs(data: object) -> list[BackendSpec]:
    """Specs from parsed YAML/JSON: a list of objects, or `{"backends": [...]}`.

    Each object has `region`, `service` and optionally `port`, `admin_port`, `host`.
    """
    if isinstance(data, dict) and "backends" in data:
        data = data["backends"]
    if not isinstance(data, list) or not data:
        raise ValueError("spec must be a non-empty list of backends (or {backends: [...]})")
    specs = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"backends[{index}]: must be an object (got {item!r})")
        try:
            specs.append(BackendSpec(**item))
        except TypeError as exc:
            raise ValueError(f"backends[{index}]: {exc}") from None
    return specs


async def start_backends(specs: Sequence[BackendSpec]) -> list[SimBackend]:
    """Start every backend, or none: on a failure the started ones are stopped."""
    backends: list[SimBackend] = []
    try:
        for spec in specs:
            backend = SimBackend(spec.region, spec.service, spec.host, spec.port, admin_port=spec.admin_port)
            await backend.start()
            backends.append(backend)
    except BaseException:
        await stop_backends(backends)
        raise
    return backends


async def stop_backends(backends: Sequence[SimBackend]) -> None:
    for backend in backends:
        await backend.stop()


async def serve(specs: Sequence[BackendSpec], stop: asyncio.Event | None = None) -> None:
    """Run backends until `stop` is set (or SIGINT/SIGTERM when not given)."""
    loop = asyncio.get_running_loop()
    signals = stop is None
    stop = stop or asyncio.Event()
    backends = await start_backends(specs)
    try:
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        ready = {
            "backends": [
                {
                    "region": b.region,
                    "service": b.service,
                    "port": b.port,
                    "admin_port": b.admin_port,
                }
                for b in backends
            ]
        }
        sys.stdout.write(orjson.dumps(ready).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await stop_backends(backends)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.testing.backend", description="Run simulated region backends."
    )
    parser.add_argument("--spec", required=True, type=Path, help="YAML/JSON list of backends")
    args = parser.parse_args(argv)
    try:
        specs = load_specs(yaml.safe_load(args.spec.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValueError) as exc:
        print(f"bad spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
