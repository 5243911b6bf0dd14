"""Configuration: YAML in, typed immutable settings out, or every mistake at once.

An SRE editing a config during an outage needs the whole list of what is wrong, each
with where and what was found, not one error per restart. `load_settings` returns a
frozen `Settings` or raises `ConfigError` whose `problems` read
`path.to.field: what is wrong (got value)`. Unknown keys are errors (a typo such as
`recovery_hold: 30` must not silently keep the default). Secrets never live in the file:
the file names an environment variable or a file, resolved when the agent starts.

The structure is checked by pydantic (strict, frozen models that forbid unknown keys);
the cross-references (an agent's region exists, demand names a known service, addresses
are unique) are checked by `_cross_check` on the raw data, so both kinds of mistake are
reported together.
"""

from __future__ import annotations

import hashlib
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from controlplane.addresses import split_host_port, url_problem
from controlplane.errors import ConfigError
from controlplane.model import SHED_FRACTION_FLAG, FeatureSpec, Policy, RegionSpec
from controlplane.promql import check_query, parse_condition

NAME = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
Name = Annotated[str, Field(pattern=NAME)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _host_port(value: str) -> str:
    split_host_port(value)  # ValueError naming what is wrong
    return value


class SecretRef(_Strict):
    """Where a secret comes from: an environment variable or a file, never the YAML."""

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self

    def resolve(self, path: str, *, strong: bool = True) -> str:
        """The secret's value; `ConfigError` naming `path` when it is missing, empty or weak.

        Weak (checked when `strong`, for the secrets this product chooses: the cluster
        secret and its tokens; not for a credential of another system, such as an etcd
        password): shorter than `MIN_SECRET_BYTES`, or a placeholder left from an example
        (`CHANGE-ME...`). The value itself is never put in the message.
        """
        if self.env is not None:
            where = f"{path}.env"
            value = os.environ.get(self.env, "")
            if not value:
                raise ConfigError([f"{where}: environment variable {self.env} is not set or empty"])
        else:
            assert self.file is not None  # guaranteed by _one_source
            where = f"{path}.file"
            try:
                value = self.file.read_bytes().decode("utf-8").strip()
            except OSError as e:
                raise ConfigError([f"{where}: cannot read ({self.file}: {e.strerror})"]) from e
            except UnicodeDecodeError:
                raise ConfigError([f"{where}: not UTF-8 text ({self.file})"]) from None
            if not value:
                raise ConfigError([f"{where}: file is empty ({self.file})"])
        weak = weakness(value) if strong else None
        if weak:
            raise ConfigError([f"{where}: {weak}"])
        return value


MIN_SECRET_BYTES = 16
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "placeholder", "your-")


def weakness(secret: str) -> str | None:
    """Why `secret` is too weak to protect a control plane (None when it is fine)."""
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        return f"must be at least {MIN_SECRET_BYTES} bytes (got {size} bytes)"
    lowered = secret.lower()
    for placeholder in _PLACEHOLDERS:
        if placeholder in lowered:
            return f"is a placeholder from an example (contains {placeholder!r}): set a real secret"
    return None


class AgentConfig(_Strict):
    id: Name
    region: Name
    raft: str
    http: str

    @field_validator("raft", "http")
    @classmethod
    def _address(cls, v: str) -> str:
        return _host_port(v)


class ClusterConfig(_Strict):
    name: Name = "controlplane"
    secret: SecretRef = SecretRef(env="CONTROLPLANE_CLUSTER_SECRET")
    agents: Annotated[tuple[AgentConfig, ...], Field(min_length=1, max_length=15)]
    # Where THIS agent connects to reach another member's Raft port, when that differs
    # from the member's `raft` address (a tunnel, NAT, or a test's fault proxy). The
    # member is still known by its `raft` address. Usually set in a per-agent file.
    dial: dict[Name, str] = {}

    @field_validator("dial")
    @classmethod
    def _dial(cls, v: dict[str, str]) -> dict[str, str]:
        for address in v.values():
            _host_port(address)
        return v


def _server_urls(v: tuple[str, ...]) -> tuple[str, ...]:
    for url in v:
        problem = url_problem(url, ("http", "https"))
        if problem:
            raise ValueError(f"{problem} (got {_fmt_value(url)})")
    if len(set(v)) != len(v):
        raise ValueError("lists a server twice")
    return v


class PrometheusDefaults(_Strict):
    """Prometheus servers every `prometheus` target asks unless it names its own."""

    servers: Annotated[tuple[str, ...], Field(max_length=8)] = ()

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _server_urls(v)


class ProbeDefaults(_Strict):
    interval_s: PositiveFloat = 1.0
    timeout_s: PositiveFloat = 0.8
    rise: Annotated[int, Strict(), Field(ge=1, le=100)] = 2
    fall: Annotated[int, Strict(), Field(ge=1, le=100)] = 3
    expect_status: tuple[Annotated[int, Strict(), Field(ge=100, le=599)], ...] = ()
    max_concurrency: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 64
    prometheus: PrometheusDefaults = PrometheusDefaults()


def _query(v: str) -> str:
    problem = check_query(v)
    if problem is not None:
        raise ValueError(f"not a valid PromQL query: {problem}")
    return v


class PromQueryConfig(_Strict):
    """A PromQL query giving one number (or one per series; the worst counts)."""

    query: str

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _query(v)


class PromDownConfig(PromQueryConfig):
    """Down when the query's value meets `when` (`== 0`, `> 0.05`) for `for_s` seconds."""

    when: str
    for_s: Annotated[float, Strict(), Field(ge=0, le=3600, allow_inf_nan=False)] = 0.0
    # How reasons name the rule ("error ratio"); the query itself when not given.
    name: Annotated[str, Field(min_length=1, max_length=80)] | None = None

    @field_validator("when")
    @classmethod
    def _when(cls, v: str) -> str:
        parse_condition(v)
        return v


class PrometheusTargetConfig(_Strict):
    """A target judged from metrics: `down` decides, `slow` (seconds) and `utilization` (0..1) inform."""

    servers: Annotated[tuple[str, ...], Field(min_length=1, max_length=8)] | None = None
    down: PromDownConfig
    slow: PromQueryConfig | None = None
    utilization: PromQueryConfig | None = None

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _server_urls(v)


class TargetConfig(_Strict):
    """One probe target: `url` (http(s)://... or tcp://host:port) or `prometheus`.

    The timing fields override `probes`.
    """

    url: str | None = None
    prometheus: PrometheusTargetConfig | None = None
    interval_s: PositiveFloat | None = None
    timeout_s: PositiveFloat | None = None
    rise: Annotated[int, Strict(), Field(ge=1, le=100)] | None = None
    fall: Annotated[int, Strict(), Field(ge=1, le=100)] | None = None
    expect_status: tuple[Annotated[int, Strict(), Field(ge=100, le=599)], ...] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("tcp://"):
            _host_port(v.removeprefix("tcp://"))
            return v
        problem = url_problem(v, ("http", "https"))
        if problem:
            raise ValueError(f"{problem}; or tcp://host:port")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> TargetConfig:
        if (self.url is None) == (self.prometheus is None):
            raise ValueError("give exactly one of url or prometheus")
        return self

    def describe(self) -> str:
        """What is probed, in one line: the URL, or the Prometheus down rule."""
        if self.prometheus is not None:
            down = self.prometheus.down
            return f"prometheus: {' '.join(down.query.split())} {down.when}"
        return str(self.url)


def _target(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class RegionServiceConfig(_Strict):
    targets: Annotated[tuple[TargetConfig, ...], Field(min_length=1, max_length=32)]
    capacity_rps: PositiveFloat | None = None
    weight: PositiveFloat | None = None
    # Where load balancers send this service's traffic in this region (host:port);
    # by default the first probe target's host and port.
    address: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)

    def data_address(self) -> str:
        """`address`, or the host:port of the first target with a URL."""
        if self.address is not None:
            return self.address
        url = next(t.url for t in self.targets if t.url is not None)
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        if ":" not in hostport:
            hostport += ":443" if url.startswith("https") else ":80"
        return hostport

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        return [_target(t) for t in v] if isinstance(v, list) else v


class RegionConfig(_Strict):
    capacity_rps: PositiveFloat
    weight: PositiveFloat | None = None
    services: Annotated[dict[Name, RegionServiceConfig], Field(min_length=1)]


class PolicyConfig(_Strict):
    observer_quorum: Annotated[int, Strict(), Field(ge=1)] | None = None
    observation_ttl_s: PositiveFloat = 10.0
    min_healthy_regions: Annotated[int, Strict(), Field(ge=1)] = 1
    # Panic when fewer regions than this would serve a service (1: when none would).
    panic_below: Annotated[int, Strict(), Field(ge=1)] = 1
    # DOWN verdicts this close to the decision entering panic are one correlated fault;
    # by default the slowest target's interval_s + timeout_s (see decide/panic.py).
    panic_correlation_s: PositiveFloat | None = None
    recovery_hold_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 30.0
    ramp_steps: Annotated[tuple[Annotated[float, Strict(), Field(gt=0, le=1)], ...], Field(min_length=1)] = (
        0.25,
        0.5,
        1.0,
    )
    ramp_step_s: PositiveFloat = 10.0
    failover_budget_s: PositiveFloat = 30.0
    slow_ms: PositiveFloat = 1000.0
    utilization_high: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.8
    degraded_factor: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.5
    restore_margin: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.1
    # A degraded region is restored only below slow_ms (and utilization_high) x (1 - this).
    degraded_margin: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.2
    demand_rps: dict[Name, PositiveFloat] = {}

    @field_validator("ramp_steps")
    @classmethod
    def _ramp(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if list(v) != sorted(v) or v[-1] != 1.0:
            raise ValueError("must increase and end at 1.0")
        return v


class FeatureConfig(_Strict):
    level: Annotated[int, Strict(), Field(ge=1, le=10)]
    saves: Fraction = 0.0
    services: tuple[Name, ...] = ()


class TokenConfig(_Strict):
    """One named bearer token: `name` is recorded as "who"; `scope` is what it may do."""

    name: Name
    scope: Literal["read", "lb", "operate", "admin"]
    secret: SecretRef


class AuthConfig(_Strict):
    """Bearer tokens. `tokens` are named, each with a scope (see `controlplane.access`).

    `admin_token` and `read_token` are the legacy single tokens, kept as tokens named
    `admin` (scope admin) and `read` (scope read). `admin_token` defaults to the
    environment variable CONTROLPLANE_ADMIN_TOKEN only when `tokens` is not given.
    `open_reads`: whether reads need no token; by default they do not unless a token of
    scope `read` is configured.
    """

    admin_token: SecretRef | None = SecretRef(env="CONTROLPLANE_ADMIN_TOKEN")
    read_token: SecretRef | None = None
    tokens: Annotated[tuple[TokenConfig, ...], Field(max_length=1000)] = ()
    open_reads: Annotated[bool, Strict()] | None = None

    @model_validator(mode="after")
    def _no_default_admin_with_named_tokens(self) -> AuthConfig:
        if self.tokens and "admin_token" not in self.model_fields_set:
            object.__setattr__(self, "admin_token", None)
        return self


class ApiTlsConfig(_Strict):
    """HTTPS for the agent's API: the certificate and key it serves, both required.

    With `client_ca_file`, mutual TLS: every client must present a certificate signed
    by that CA, or the handshake fails. The files are read when the agent starts (and by
    `check-config`): `api/tls.py` reports what cannot be read or does not match.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class ApiConfig(_Strict):
    # HTTPS when set (see ApiTlsConfig); plain HTTP otherwise.
    tls: ApiTlsConfig | None = None
    max_body_bytes: Annotated[int, Strict(), Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_watchers: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 20_000
    # Open connections at most; by default 25000 or what the open-file limit allows
    # (see api/server.py). Watchers live inside it.
    max_connections: Annotated[int, Strict(), Field(ge=32, le=1_000_000)] | None = None
    # A connection must send a whole request head this soon after it opens (and after
    # each answer, when kept alive), and a request body this soon after its head.
    header_timeout_s: Annotated[float, Strict(), Field(gt=0, le=300)] = 10.0
    body_timeout_s: Annotated[float, Strict(), Field(gt=0, le=300)] = 10.0
    max_wait_s: Annotated[float, Strict(), Field(gt=0, le=600)] = 300.0
    history_page_max: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 500
    # A load balancer's report is kept for 10 of its heartbeats without a newer one, and
    # never less than this (see controlplane/lbreports.py).
    lb_report_min_expiry_s: Annotated[float, Strict(), Field(ge=1, le=86_400)] = 60.0


class RaftConfig(_Strict):
    election_timeout_min_s: PositiveFloat = 0.4
    election_timeout_max_s: PositiveFloat = 0.8
    heartbeat_s: PositiveFloat = 0.05
    commit_timeout_s: PositiveFloat = 3.0
    # How long after its last confirmation a member still calls its decision fresh.
    fresh_window_s: PositiveFloat = 1.0
    # A snapshot (and a shorter journal) after this many entries since the last one. The
    # entries since the last snapshot are also held in memory: a lower number is a
    # smaller agent, at the cost of a snapshot (the whole state, small) more often.
    snapshot_entries: Annotated[int, Strict(), Field(ge=10, le=10_000_000)] = 1000


class TlsConfig(_Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class EtcdConfig(_Strict):
    endpoints: Annotated[tuple[str, ...], Field(min_length=1)]
    prefix: str = Field(default="/controlplane", pattern=r"^/[A-Za-z0-9/_.-]*$")
    lease_ttl_s: Annotated[int, Strict(), Field(ge=2, le=300)] = 5
    timeout_s: PositiveFloat = 3.0
    tls: TlsConfig | None = None
    username: str | None = None
    password: SecretRef | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for e in v:
            _host_port(re.sub(r"^https?://", "", e))
        return v


class BackendConfig(_Strict):
    kind: Literal["raft", "etcd"] = "raft"
    raft: RaftConfig = RaftConfig()
    etcd: EtcdConfig | None = None


class SettingsModel(_Strict):
    cluster: ClusterConfig
    regions: Annotated[dict[Name, RegionConfig], Field(min_length=1)]
    probes: ProbeDefaults = ProbeDefaults()
    policy: PolicyConfig = PolicyConfig()
    features: dict[Name, FeatureConfig] = {}
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    backend: BackendConfig = BackendConfig()
    data_dir: Path = Path("/var/lib/controlplane")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration plus the derived decision `Policy`."""

    model: SettingsModel
    policy: Policy
    source: str

    @property
    def cluster(self) -> ClusterConfig:
        return self.model.cluster

    @property
    def regions(self) -> Mapping[str, RegionConfig]:
        return self.model.regions

    @property
    def services(self) -> tuple[str, ...]:
        return self.policy.services

    @property
    def config_hash(self) -> str:
        """12 hex digits of SHA-256 over the validated configuration (not its formatting).

        Every agent of one cluster loads the same file, so every agent shows the same hash;
        two hashes in `cpctl status` mean a change is half rolled out. Secrets are
        references (env, file), never values, so the hash reveals nothing.
        """
        return hashlib.sha256(self.model.model_dump_json().encode()).hexdigest()[:12]

    @property
    def api_scheme(self) -> str:
        """`https` when the agents serve their API over TLS (`api.tls`), else `http`."""
        return "https" if self.model.api.tls is not None else "http"

    def agent_url(self, agent: AgentConfig) -> str:
        """The base URL of `agent`'s API: its `http` address with the scheme of `api.tls`."""
        return f"{self.api_scheme}://{agent.http}"

    def agent(self, agent_id: str) -> AgentConfig:
        for a in self.model.cluster.agents:
            if a.id == agent_id:
                return a
        known = ", ".join(a.id for a in self.model.cluster.agents)
        raise ConfigError([f"agent id: {agent_id!r} is not in cluster.agents (known: {known})"])


# ---------------------------------------------------------------------------


def _fmt_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def _fmt_value(value: Any) -> str:
    """A short repr of what was found: bounded work and length, whatever the input."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems_from(error: ValidationError) -> list[str]:
    problems = []
    errors = error.errors(include_url=False)
    locs = [e["loc"] for e in errors]
    for e in errors:
        # A too-short list whose items failed is reported through its items.
        if e["type"] == "too_short" and any(
            len(o) > len(e["loc"]) and o[: len(e["loc"])] == e["loc"] for o in locs
        ):
            continue
        # pydantic names the branch of a union or a validator in the location; drop it.
        loc = tuple(
            p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            problems.append(f"{_fmt_loc(loc)}: required but missing")
            continue
        problems.append(f"{_fmt_loc(loc)}: {msg[0].lower() + msg[1:]} (got {_fmt_value(e['input'])})")
    return problems


def _cross_check(raw: Mapping[str, Any]) -> list[str]:
    """References between sections; tolerant of structurally broken data."""
    problems: list[str] = []

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    regions = mapping(raw.get("regions"))
    services: set[str] = set()
    for region in regions.values():
        services.update(str(s) for s in mapping(mapping(region).get("services")))

    agents = mapping(raw.get("cluster")).get("agents")
    seen: dict[str, dict[Any, int]] = {"id": {}, "raft": {}, "http": {}}
    for i, item in enumerate(agents if isinstance(agents, list) else []):
        agent = mapping(item)
        region = agent.get("region")
        if isinstance(region, str) and regions and region not in regions:
            problems.append(f"cluster.agents[{i}].region: not a region in regions (got {region!r})")
        for key, first in seen.items():
            value = agent.get(key)
            if not isinstance(value, str | int | float):
                continue  # missing or not a value: the structure check reports it
            if value in first:
                problems.append(
                    f"cluster.agents[{i}].{key}: same as cluster.agents[{first[value]}] (got {value!r})"
                )
            else:
                first[value] = i

    problems.extend(_check_listen_addresses(agents if isinstance(agents, list) else []))

    ids: set[str] = set()
    for agent in agents if isinstance(agents, list) else []:
        agent_id = mapping(agent).get("id")
        if isinstance(agent_id, str):
            ids.add(agent_id)
    for member in mapping(mapping(raw.get("cluster")).get("dial")):
        if ids and member not in ids:
            problems.append(f"cluster.dial.{member}: not an agent id in cluster.agents (got {member!r})")

    policy = mapping(raw.get("policy"))
    for service in mapping(policy.get("demand_rps")):
        if service not in services:
            problems.append(f"policy.demand_rps.{service}: not a service of any region (got {service!r})")
    mhr = policy.get("min_healthy_regions")
    if isinstance(mhr, int) and regions and mhr > len(regions):
        problems.append(
            f"policy.min_healthy_regions: more than the {len(regions)} regions configured (got {mhr})"
        )
    panic_below = policy.get("panic_below")
    if isinstance(panic_below, int) and regions and panic_below > len(regions):
        problems.append(
            f"policy.panic_below: more than the {len(regions)} regions configured (got {panic_below})"
        )
    problems.extend(_check_detection(raw))
    quorum = policy.get("observer_quorum")
    if isinstance(quorum, int) and isinstance(agents, list) and quorum > len(agents):
        problems.append(f"policy.observer_quorum: more than the {len(agents)} agents (got {quorum})")

    problems.extend(_check_prometheus_targets(raw))

    for name, feature in mapping(raw.get("features")).items():
        if name == SHED_FRACTION_FLAG:
            problems.append(
                f"features.{name}: the name is taken by the shed fraction's feature flag (got {name!r})"
            )
        for j, service in enumerate(mapping(feature).get("services") or []):
            if service not in services:
                problems.append(
                    f"features.{name}.services[{j}]: not a service of any region (got {service!r})"
                )

    for service in sorted(services):
        with_weight = [
            r
            for r, region in regions.items()
            if service in mapping(mapping(region).get("services"))
            and (
                mapping(region).get("weight") is not None
                or mapping(mapping(mapping(region).get("services")).get(service)).get("weight") is not None
            )
        ]
        running = [r for r, region in regions.items() if service in mapping(mapping(region).get("services"))]
        if with_weight and len(with_weight) != len(running):
            missing = sorted(set(running) - set(with_weight))
            problems.append(
                f"regions.{missing[0]}.services.{service}.weight: set a weight in every region running "
                f"{service} or in none (got none here, but {', '.join(with_weight)} set one)"
            )

    problems.extend(_check_token_names(mapping(raw.get("auth"))))

    backend = mapping(raw.get("backend"))
    if backend.get("kind") == "etcd" and backend.get("etcd") is None:
        problems.append("backend.etcd: required when backend.kind is etcd (got nothing)")
    raft = mapping(backend.get("raft"))
    lo, hi, hb = (
        raft.get("election_timeout_min_s", 0.4),
        raft.get("election_timeout_max_s", 0.8),
        raft.get("heartbeat_s", 0.05),
    )
    if all(isinstance(x, int | float) for x in (lo, hi, hb)):
        if hi <= lo:
            problems.append(
                f"backend.raft.election_timeout_max_s: must exceed election_timeout_min_s (got {hi})"
            )
        if lo <= 3 * hb:
            problems.append(f"backend.raft.heartbeat_s: must be below election_timeout_min_s / 3 (got {hb})")
    return problems


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "[::]", "::", ""})


def _check_listen_addresses(agents: list[Any]) -> list[str]:
    """No two listeners (any agent's raft or http) on one port of one host.

    Agents on other hosts may share ports; on one host (or a wildcard address) a raft
    port equal to an http port makes the second listener fail at start, or worse, lets
    HTTP clients talk to the Raft port.
    """
    problems: list[str] = []
    taken: dict[tuple[str, int], str] = {}
    for i, item in enumerate(agents):
        agent = item if isinstance(item, Mapping) else {}
        for kind in ("raft", "http"):
            value = agent.get(kind)
            if not isinstance(value, str):
                continue
            try:
                host, port = split_host_port(value)
            except ValueError:
                continue  # reported by the structure check
            where = f"cluster.agents[{i}].{kind}"
            clash = taken.get((host, port)) or next(
                (
                    w
                    for (h, p), w in taken.items()
                    if p == port and (h in _WILDCARD_HOSTS or host in _WILDCARD_HOSTS)
                ),
                None,
            )
            if clash is not None and clash.rsplit(".", 1)[1] != kind:
                problems.append(f"{where}: same port as {clash} on the same host (got {_fmt_value(value)})")
            taken.setdefault((host, port), where)
    return problems


def _check_token_names(auth: Mapping[str, Any]) -> list[str]:
    """Token names are unique, and `admin`/`read` are taken when the legacy tokens are set."""
    problems: list[str] = []
    tokens = auth.get("tokens")
    taken: dict[str, str] = {}
    legacy_admin = auth.get("admin_token") is not None if "admin_token" in auth else not tokens
    if legacy_admin:
        taken["admin"] = "auth.admin_token"
    if auth.get("read_token") is not None:
        taken["read"] = "auth.read_token"
    for i, token in enumerate(tokens if isinstance(tokens, list) else []):
        name = token.get("name") if isinstance(token, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in taken:
            problems.append(f"auth.tokens[{i}].name: same name as {taken[name]} (got {_fmt_value(name)})")
        else:
            taken[name] = f"auth.tokens[{i}]"
    return problems


def _check_prometheus_targets(raw: Mapping[str, Any]) -> list[str]:
    """Prometheus targets need servers from somewhere; services need a data address."""

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    problems: list[str] = []
    default_servers = mapping(mapping(raw.get("probes")).get("prometheus")).get("servers")
    for region_name, region in mapping(raw.get("regions")).items():
        for service_name, service in mapping(mapping(region).get("services")).items():
            where = f"regions.{region_name}.services.{service_name}"
            targets = mapping(service).get("targets")
            targets = targets if isinstance(targets, list) else []
            with_url = False
            for i, target in enumerate(targets):
                if isinstance(target, str) or mapping(target).get("url") is not None:
                    with_url = True
                prometheus = mapping(target).get("prometheus") if isinstance(target, Mapping) else None
                if isinstance(prometheus, Mapping) and not prometheus.get("servers") and not default_servers:
                    problems.append(
                        f"{where}.targets[{i}].prometheus.servers: required here or in "
                        "probes.prometheus.servers (got none)"
                    )
            if targets and not with_url and mapping(service).get("address") is None:
                problems.append(
                    f"{where}.address: required when every target is a prometheus probe "
                    "(load balancers need the service's host:port) (got none)"
                )
    return problems


# Time from an observer's last failed probe to a committed decision that load balancers
# can read: delivering the observation, deciding, committing it through consensus.
COMMIT_ALLOWANCE_S = 1.0
# The agents refresh their observations in the store every observation_ttl_s / 3
# (agent/daemon.py); an unchanged observation ages that much more before it is replaced.
REFRESH_FRACTION = 1 / 3


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _field_at(
    where: str, timing: Mapping[str, float | None], own: Mapping[str, bool], *fields: str
) -> tuple[str, float]:
    """The first of `fields` a target overrides (else the first), as path and value."""
    chosen = next((f for f in fields if own.get(f)), fields[0])
    return f"{where}.{chosen}", timing[chosen] or 0.0


def _check_detection(raw: Mapping[str, Any]) -> list[str]:
    """Probe timings that no decision could work with, for the defaults and every target.

    - Freshness: an observation carries the time of its last probe and, unchanged, is
      rewritten only by the periodic refresh, so just before it is replaced it is
      interval_s + timeout_s (the next probe) + observation_ttl_s / 3 (the refresh) +
      the commit old. If that exceeds observation_ttl_s, observers drop out of the
      quorum between probes and a failover may never gather one:
      observation_ttl_s > 1.5 x (interval_s + timeout_s + commit).
    - Budget: a failure is acted on after at most fall x interval_s + timeout_s (the
      fall-th failed probe, the first one starting up to an interval after the fault)
      plus the commit, which must fit in policy.failover_budget_s. A prometheus
      target's down rule must first hold for its `for_s`, which adds to that.

    Each problem is reported at the field to change: `probes.<field>` when the
    target uses the default, the target's own field when it overrides it.
    """

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    policy = mapping(raw.get("policy"))
    defaults = mapping(raw.get("probes"))
    ttl = _number(policy.get("observation_ttl_s", 10.0))
    budget = _number(policy.get("failover_budget_s", 30.0))
    fallback = {"interval_s": 1.0, "timeout_s": 0.8, "fall": 3}
    default = {k: _number(defaults.get(k, v)) for k, v in fallback.items()}
    problems: list[str] = []
    timings: list[tuple[str, dict[str, float | None], dict[str, bool]]] = [("probes", default, {})]
    for region_name, region in mapping(raw.get("regions")).items():
        for service_name, service in mapping(mapping(region).get("services")).items():
            targets = mapping(service).get("targets")
            for i, target in enumerate(targets if isinstance(targets, list) else []):
                own = {k: k in mapping(target) for k in fallback}
                hold = _number(mapping(mapping(mapping(target).get("prometheus")).get("down")).get("for_s"))
                if not any(own.values()) and not hold:
                    continue
                values = {k: _number(mapping(target)[k]) if own[k] else default[k] for k in fallback}
                values["for_s"] = hold
                own["for_s"] = bool(hold)
                timings.append((f"regions.{region_name}.services.{service_name}.targets[{i}]", values, own))
    for where, t, own in timings:
        interval, timeout, fall = t["interval_s"], t["timeout_s"], t["fall"]
        if interval is None or timeout is None or fall is None:
            continue  # the structure check reports the bad value
        hold = t.get("for_s") or 0.0

        if ttl is not None:
            # ttl > interval + timeout + commit + ttl x REFRESH_FRACTION, solved for ttl.
            factor = 1 / (1 - REFRESH_FRACTION)
            bound = factor * (interval + timeout + COMMIT_ALLOWANCE_S)
            if ttl <= bound:
                at, got = _field_at(where, t, own, "interval_s", "timeout_s")
                problems.append(
                    f"{at}: observations would expire between probes: policy.observation_ttl_s {ttl:g} "
                    f"must exceed {factor:g} x (interval_s {interval:g} + timeout_s {timeout:g} + "
                    f"{COMMIT_ALLOWANCE_S:g} s to commit) = {round(bound, 2):g} s (got {got:g})"
                )
        if budget is not None:
            detection = hold + fall * interval + timeout + COMMIT_ALLOWANCE_S
            if detection > budget:
                if hold:
                    at, got = f"{where}.prometheus.down.for_s", hold
                else:
                    at, got = _field_at(where, t, own, "interval_s", "fall", "timeout_s")
                held = f"for_s {hold:g} + " if hold else ""
                problems.append(
                    f"{at}: a failure takes {held}fall {fall:g} x interval_s {interval:g} + "
                    f"timeout_s {timeout:g} + {COMMIT_ALLOWANCE_S:g} s to commit = {round(detection, 2):g} s "
                    f"to act on, more than "
                    f"policy.failover_budget_s {budget:g} (got {got:g})"
                )
    return problems


# A configuration file is small: these bound the work of reading one, whatever it holds.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 40
# Values after aliases are expanded (a 2 KB "billion laughs" file expands to billions).
MAX_YAML_VALUES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, keys that are not plain values, nesting
    deeper than `MAX_YAML_DEPTH` and documents whose aliases expand past
    `MAX_YAML_VALUES` values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_YAML_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """How many values `root` holds once every alias is expanded (memoized, no recursion)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done:
            if id(node) in open_nodes:
                raise ConfigError(
                    [f"line {node.start_mark.line + 1}: an alias refers to itself (not valid YAML)"]
                )
            open_nodes.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 0) for c in children), MAX_YAML_VALUES + 1)
            open_nodes.discard(id(node))
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not a {kind}", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_fmt_value(key)}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _build_policy(m: SettingsModel) -> Policy:
    services: list[str] = []
    for region in m.regions.values():
        services.extend(s for s in region.services if s not in services)
    regions = []
    for name, region in m.regions.items():
        capacity = {s: sc.capacity_rps or region.capacity_rps for s, sc in region.services.items()}
        base = {s: sc.weight or region.weight or capacity[s] for s, sc in region.services.items()}
        regions.append(RegionSpec(name=name, capacity_rps=capacity, base_weight=base))
    p = m.policy
    correlation_s = p.panic_correlation_s
    if correlation_s is None:
        # One fault is seen on every target within one interval plus one timeout.
        correlation_s = max(
            (t.interval_s or m.probes.interval_s) + (t.timeout_s or m.probes.timeout_s)
            for region in m.regions.values()
            for service in region.services.values()
            for t in service.targets
        )
    return Policy(
        regions=tuple(regions),
        services=tuple(services),
        demand_rps=dict(p.demand_rps),
        features=tuple(
            FeatureSpec(name=n, level=f.level, saves=f.saves, services=f.services)
            for n, f in m.features.items()
        ),
        observer_quorum=p.observer_quorum,
        observation_ttl_s=p.observation_ttl_s,
        min_healthy_regions=p.min_healthy_regions,
        recovery_hold_s=p.recovery_hold_s,
        ramp_steps=p.ramp_steps,
        ramp_step_s=p.ramp_step_s,
        failover_budget_s=p.failover_budget_s,
        slow_ms=p.slow_ms,
        utilization_high=p.utilization_high,
        degraded_factor=p.degraded_factor,
        restore_margin=p.restore_margin,
        observers={a.id: a.region for a in m.cluster.agents},
        panic_below=p.panic_below,
        panic_correlation_s=correlation_s,
        degraded_margin=p.degraded_margin,
    )


def parse_settings(raw: Any, source: str = "<config>") -> Settings:
    """Validate already-parsed YAML data; `ConfigError` lists every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError([f"(top level): must be a mapping of sections (got {_fmt_value(raw)})"])
    problems: list[str] = []
    model: SettingsModel | None = None
    try:
        model = SettingsModel.model_validate(raw)
    except ValidationError as e:
        problems.extend(_problems_from(e))
    try:
        problems.extend(_cross_check(raw))
    except (TypeError, ValueError, AttributeError):
        # Cross-references read the raw data; a value of a type no field allows can
        # trip them, and the structure check has already named it.
        if not problems:
            raise
    if problems or model is None:
        raise ConfigError(sorted(dict.fromkeys(problems)))
    return Settings(model=model, policy=_build_policy(model), source=source)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a YAML file; `ConfigError` lists every problem found."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{p}: cannot read ({e.strerror})"]) from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{p}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a configuration file"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problem = f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})"
        raise ConfigError([problem]) from None
    return parse_settings(parse_yaml(text), source=str(p))


def parse_yaml(text: str) -> Any:
    """One YAML document as plain data; `ConfigError` (one line) when it cannot be read."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                [f"YAML: more than {MAX_YAML_VALUES} values once aliases are expanded (an alias bomb?)"]
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{where}: {problem} (not valid YAML)"]) from None
    except RecursionError:
        raise ConfigError([f"YAML: nested too deeply (at most {MAX_YAML_DEPTH} levels)"]) from None
    finally:
        loader.dispose()
