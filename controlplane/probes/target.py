"""What to probe, and what one probe found.

`ProbeTarget` is built by the configuration module from YAML; it is a plain frozen
dataclass so settings stay immutable and tests can write one by hand. A `prometheus`
target carries a `PrometheusProbe`: the servers to ask and the queries that say down,
slow and how busy. `ProbeResult` is the outcome of a single probe, before any rise/fall
counting: ok, failed, or inconclusive (the probe could not tell; never a failure).

`ProbeTarget.__post_init__` rejects values that would make the prober misbehave (a zero
interval would spin, a zero `rise` would never count). The configuration module is
expected to report friendlier, path-named errors first; these checks are the last line,
raised as `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controlplane.promql import Condition

ProbeKind = Literal["http", "tcp", "prometheus"]

# HAProxy's `http-check expect` default: any 2xx or 3xx.
DEFAULT_EXPECT_STATUS: tuple[int, ...] = tuple(range(200, 400))


@dataclass(frozen=True, slots=True)
class PrometheusProbe:
    """What a `prometheus` target asks and of whom.

    `down_query` is evaluated every interval; the target fails a probe once the value
    has met `down_when` continuously for `down_for_s` (Prometheus' `for:`). When the
    query returns several series, it is enough that one of them meets the condition,
    as an alert rule fires for any series. `slow_query` gives a latency in seconds
    (Prometheus' base unit, e.g. a `histogram_quantile`) and `utilization_query` a
    fraction 0..1 (e.g. memory used / limit); the worst series counts. `servers` are
    tried in order, starting with the last one that answered. `down_name` names the
    down rule in reasons (the query itself when empty).
    """

    servers: tuple[str, ...]
    down_query: str
    down_when: Condition
    down_for_s: float = 0.0
    down_name: str = ""
    slow_query: str | None = None
    utilization_query: str | None = None

    def describe_down(self) -> str:
        """The rule in words, for reasons: `prometheus: up{job="order"} == 0 for 15 s`."""
        name = self.down_name or _shorten(" ".join(self.down_query.split()), 80)
        held = f" for {self.down_for_s:g} s" if self.down_for_s else ""
        return f"prometheus: {name} {self.down_when}{held}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One endpoint that tells whether `service` can serve in `region`.

    `kind` "http" uses `url`; "tcp" uses `host` and `port`; "prometheus" uses
    `prometheus`. A target is locally up after `rise` consecutive successes and down
    after `fall` consecutive failures; inconclusive probes count neither way.
    """

    region: str
    service: str
    kind: ProbeKind
    url: str | None = None
    host: str | None = None
    port: int | None = None
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3
    expect_status: tuple[int, ...] = DEFAULT_EXPECT_STATUS
    prometheus: PrometheusProbe | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind == "http":
            if not self.url:
                problems.append("http probe needs url")
        elif self.kind == "tcp":
            if not self.host or self.port is None:
                problems.append("tcp probe needs host and port")
            elif not 0 < self.port < 65536:
                problems.append(f"port out of range (got {self.port})")
        elif self.kind == "prometheus":
            if self.prometheus is None or not self.prometheus.servers:
                problems.append("prometheus probe needs servers and a down query")
            elif self.prometheus.down_for_s < 0:
                problems.append(f"down_for_s must be >= 0 (got {self.prometheus.down_for_s})")
        else:
            problems.append(f"kind must be http, tcp or prometheus (got {self.kind!r})")
        if not self.interval_s > 0:
            problems.append(f"interval_s must be > 0 (got {self.interval_s})")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0 (got {self.timeout_s})")
        if self.rise < 1:
            problems.append(f"rise must be >= 1 (got {self.rise})")
        if self.fall < 1:
            problems.append(f"fall must be >= 1 (got {self.fall})")
        if not self.expect_status:
            problems.append("expect_status must not be empty")
        if problems:
            raise ValueError(f"probe target {self.region}/{self.service}: " + "; ".join(problems))

    @property
    def key(self) -> tuple[str, str]:
        """The (region, service) this target speaks for."""
        return (self.region, self.service)

    @property
    def address(self) -> str:
        """What is probed, for logs and task names: the URL, `tcp://host:port` or the query."""
        if self.kind == "http":
            return str(self.url)
        if self.kind == "prometheus" and self.prometheus is not None:
            return f"promql:{' '.join(self.prometheus.down_query.split())}"
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome. `duration_s` is measured with `time.monotonic`.

    `status` is the HTTP status when a response arrived; `utilization` what the target
    reported in a JSON body (clamped to 0..1); `error` a short phrase when not `ok`.
    `inconclusive` (never with `ok`): the probe could not tell, say a Prometheus that
    does not answer; it is not a failure and counts neither way. `reported_latency_ms`
    is the latency the target's metrics report, when the probe's own duration is not
    the service's latency (a Prometheus query): `latency_ms` is then that, or None.
    `timed_out`: the failure is a deadline that fired, so it depends on this agent's
    own timing (`timing.judge_timing` makes it inconclusive when the deadline was late).
    """

    ok: bool
    duration_s: float
    error: str | None = None
    status: int | None = None
    utilization: float | None = None
    inconclusive: bool = False
    reported_latency_ms: float | None = None
    latency_from_metrics: bool = False
    timed_out: bool = False

    @property
    def latency_ms(self) -> float | None:
        if self.latency_from_metrics:
            return self.reported_latency_ms
        return self.duration_s * 1000.0
