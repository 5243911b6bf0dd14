"""What to probe, and what one probe found.

`ProbeTarget` is built by the configuration module from YAML; it is a plain frozen
dataclass so settings stay immutable and tests can write one by hand. `ProbeResult` is
the outcome of a single probe, before any rise/fall counting.

`ProbeTarget.__post_init__` rejects values that would make the prober misbehave (a zero
interval would spin, a zero `rise` would never count). The configuration module is
expected to report friendlier, path-named errors first; these checks are the last line,
raised as `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProbeKind = Literal["http", "tcp"]

# HAProxy's `http-check expect` default: any 2xx or 3xx.
DEFAULT_EXPECT_STATUS: tuple[int, ...] = tuple(range(200, 400))


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One endpoint that tells whether `service` can serve in `region`.

    `kind` "http" uses `url`; "tcp" uses `host` and `port`. A target is locally up after
    `rise` consecutive successes and down after `fall` consecutive failures.
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
        else:
            problems.append(f"kind must be http or tcp (got {self.kind!r})")
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
        """What is probed, for logs and metric labels: the URL or `tcp://host:port`."""
        if self.kind == "http":
            return str(self.url)
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome. `duration_s` is measured with `time.monotonic`.

    `status` is the HTTP status when a response arrived; `utilization` what the target
    reported in a JSON body (clamped to 0..1); `error` a short phrase when not `ok`.
    """

    ok: bool
    duration_s: float
    error: str | None = None
    status: int | None = None
    utilization: float | None = None

    @property
    def latency_ms(self) -> float:
        return self.duration_s * 1000.0
