"""One service's weights rendered for a load balancer: pure functions, no IO.

A decision (the `model.Decision`, or its JSON shape as `GET /v1/decision` serves it) and
one service go in; what a load balancer consumes comes out:

- `haproxy_plan` / `haproxy_commands`: HAProxy runtime API commands
  (`set server BACKEND/SERVER weight N`, `set server BACKEND/SERVER state ready|maint`),
  given where each region lives in HAProxy: region -> (backend, server);
- `nginx_upstream`: an nginx `upstream NAME { server host:port weight=N; ... }` block,
  given region -> "host:port";
- `envoy_cla` / `envoy_discovery_response`: an Envoy v3 `ClusterLoadAssignment` with one
  locality per region and the weight as its `load_balancing_weight`, given
  region -> "host:port".

What every renderer guarantees:

- A region serves when its state is `healthy` or `degraded` and its weight is above 0
  (a degraded region's weight is already scaled down by the decision). A region that is
  `down` or `drained`, or has weight 0, gets no traffic: HAProxy `state maint` (down,
  drained) or weight 0, nginx `down` (nginx weights start at 1), no Envoy locality.
- Never a black hole. When the decision would leave no mapped server of a backend (an
  upstream, a cluster) serving, nothing is rendered for it: `haproxy_plan` marks it
  `held` and emits no command for it, and the text/dict renderers raise
  `NoServingRegion` (HTTP 409 through the API). The caller keeps what the load balancer
  has now and reports it.
- Regions in the address map that the decision does not list for the service are
  treated as not serving (the control plane does not vouch for them); regions in the
  decision without an address are skipped and named in `HaproxyPlan.notes`.
- Output order follows the address map, so the same inputs give byte-identical output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.addresses import split_host_port
from controlplane.errors import NotFound, Rejected, Unsafe
from controlplane.model import Decision, Placement, State, decision_from_json

DecisionLike = Decision | Mapping[str, Any]
AddressMap = Mapping[str, str]  # region -> "host:port" ("[v6]:port" for IPv6)
ServerMap = Mapping[str, tuple[str, str]]  # region -> (HAProxy backend, server)

ENVOY_CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
HAPROXY_MAX_WEIGHT = 256
SERVING_STATES = frozenset({State.HEALTHY, State.DEGRADED})


class NoServingRegion(Unsafe):
    """The decision would take every server of a backend out; keep what is in place."""

    code = "no_serving_region"


def as_decision(decision: DecisionLike) -> Decision:
    """The `Decision` itself, or one parsed from its JSON shape (`Rejected` if malformed)."""
    if isinstance(decision, Decision):
        return decision
    try:
        return decision_from_json(decision)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise Rejected("bad decision", f"not a decision in the shape GET /v1/decision serves: {e!r}") from e


def placements_of(decision: Decision, service: str) -> Mapping[str, Placement]:
    """The service's placements; `NotFound` when the decision does not know the service."""
    placements = decision.services.get(service)
    if placements is None:
        known = ", ".join(sorted(decision.services)) or "none"
        raise NotFound("unknown service", f"service {service!r} is not in the decision (known: {known})")
    return placements


def serving_weight(placement: Placement | None) -> int:
    """The weight a load balancer should give: 0 unless the region serves."""
    if placement is None or placement.state not in SERVING_STATES:
        return 0
    return max(0, placement.weight)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into (host without brackets, port); `Rejected` otherwise.

    Strict (`controlplane.addresses`): what comes back can be written into a load
    balancer's configuration as it is, and what could not is refused here.
    """
    try:
        return split_host_port(address)
    except ValueError as e:
        raise Rejected("bad address", f"{e} (got {address[:80]!r})") from None


def _describe(region: str, placement: Placement | None) -> str:
    if placement is None:
        return f"{region} not in decision"
    if placement.state in SERVING_STATES and placement.weight <= 0:
        return f"{region} {placement.state}, weight 0"
    return f"{region} {placement.state}"


# -- HAProxy ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSetting:
    """What one HAProxy server should be set to."""

    region: str
    backend: str
    server: str
    weight: int
    ready: bool  # False: `state maint`

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.server}"

    @property
    def serving(self) -> bool:
        return self.ready and self.weight > 0

    def commands(self) -> tuple[str, ...]:
        """Runtime API commands; a server coming back gets its weight before `ready`."""
        weight = f"set server {self.name} weight {self.weight}"
        if self.ready:
            return (weight, f"set server {self.name} state ready")
        return (f"set server {self.name} state maint", weight)


@dataclass(frozen=True, slots=True)
class HaproxyPlan:
    """The settings for one service, safe to apply in order.

    `settings` lists serving servers first, so that a server taking traffic is in place
    before another one is taken out. `held` names the backends left as they are because
    the decision would have left none of their mapped servers serving.
    """

    service: str
    revision: int
    settings: tuple[ServerSetting, ...]
    held: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(c for s in self.settings for c in s.commands())


def haproxy_plan(decision: DecisionLike, service: str, servers: ServerMap) -> HaproxyPlan:
    """The HAProxy settings for `service` under `decision`, never all out per backend.

    `servers` maps a region to its (backend, server) in HAProxy. Down and drained regions
    are put in `maint` with weight 0; healthy and degraded ones `ready` with their weight
    (a 0 weight stays `ready`: the region is up but not given traffic yet). A backend
    whose mapped servers would all get no traffic is `held`: no setting for it.
    """
    d = as_decision(decision)
    placements = placements_of(d, service)
    notes = [
        f"{r}: in the decision but not mapped to an HAProxy server" for r in placements if r not in servers
    ]
    by_backend: dict[str, list[ServerSetting]] = {}
    for region, (backend, server) in servers.items():
        p = placements.get(region)
        ready = p is not None and p.state in SERVING_STATES
        weight = min(HAPROXY_MAX_WEIGHT, serving_weight(p))
        by_backend.setdefault(backend, []).append(ServerSetting(region, backend, server, weight, ready))
    held = []
    serving: list[ServerSetting] = []
    idle: list[ServerSetting] = []
    for backend, settings in by_backend.items():
        if not any(s.serving for s in settings):
            held.append(backend)
            states = ", ".join(_describe(s.region, placements.get(s.region)) for s in settings)
            notes.append(
                f"{backend}: revision {d.revision} leaves no server of {backend} serving ({states}); "
                "kept as it is"
            )
            continue
        serving.extend(s for s in settings if s.serving)
        idle.extend(s for s in settings if not s.serving)
    return HaproxyPlan(
        service=service,
        revision=d.revision,
        settings=tuple(serving + idle),
        held=tuple(held),
        notes=tuple(notes),
    )


def haproxy_commands(decision: DecisionLike, service: str, servers: ServerMap) -> str:
    """The runtime API commands for `service`, one per line (for `GET /v1/weights`).

    Raises `NoServingRegion` rather than emit commands that would leave a backend with
    no server serving; `NotFound` for a service the decision does not know.
    """
    plan = haproxy_plan(decision, service, servers)
    if plan.held:
        raise NoServingRegion("no serving region", "; ".join(n for n in plan.notes if "kept as it is" in n))
    return "".join(c + "\n" for c in plan.commands)


# -- nginx -----------------------------------------------------------------------------


def nginx_upstream(
    decision: DecisionLike,
    service: str,
    addresses: AddressMap,
    *,
    name: str | None = None,
    server_params: str = "",
) -> str:
    """An nginx `upstream` block for `service` (named `name`, by default the service).

    One `server` line per region of `addresses`, in its order: `weight=N` for a serving
    region, `down` otherwise (down, drained, weight 0, or not in the decision: nginx
    weights start at 1). `server_params` (such as `max_fails=0`) is added to every
    server line. Raises `NoServingRegion` when no region would serve.
    """
    d = as_decision(decision)
    placements = placements_of(d, service)
    upstream = name or service
    params = f" {server_params.strip()}" if server_params.strip() else ""
    # No revision in the text: revisions that change nothing for this service must render
    # the same bytes, or every one of them would cost an nginx reload.
    lines = [f"# controlplane: service {service}", f"upstream {upstream} {{"]
    any_serving = False
    for region, address in addresses.items():
        split_address(address)
        p = placements.get(region)
        weight = serving_weight(p)
        any_serving = any_serving or weight > 0
        setting = f"weight={weight}" if weight > 0 else "down"
        lines.append(f"    server {address}{params} {setting};  # {_describe(region, p)}")
    lines.append("}")
    if not any_serving:
        raise NoServingRegion(
            "no serving region",
            f"revision {d.revision} leaves no server of upstream {upstream} serving; keep the current one",
        )
    return "\n".join(lines) + "\n"


# -- Envoy -----------------------------------------------------------------------------


def envoy_cla(decision: DecisionLike, service: str, addresses: AddressMap) -> dict[str, Any]:
    """An Envoy v3 `ClusterLoadAssignment` for `service` (JSON as Envoy reads it).

    One locality per serving region (`locality.region`), its weight as
    `load_balancing_weight` (always >= 1: zero-weight regions are left out), one
    endpoint per region at its address. Envoy only honours locality weights when the
    cluster sets `common_lb_config.locality_weighted_lb_config`. Raises
    `NoServingRegion` when no region would serve.
    """
    d = as_decision(decision)
    placements = placements_of(d, service)
    endpoints = []
    for region, address in addresses.items():
        host, port = split_address(address)
        weight = serving_weight(placements.get(region))
        if weight <= 0:
            continue
        endpoints.append(
            {
                "locality": {"region": region},
                "load_balancing_weight": weight,
                "lb_endpoints": [
                    {
                        "endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}},
                        "health_status": "HEALTHY",
                    }
                ],
            }
        )
    if not endpoints:
        raise NoServingRegion(
            "no serving region",
            f"revision {d.revision} leaves no locality of cluster {service} serving; keep the current one",
        )
    return {"cluster_name": service, "endpoints": endpoints}


def envoy_discovery_response(decision: DecisionLike, service: str, addresses: AddressMap) -> dict[str, Any]:
    """`envoy_cla` wrapped as the `DiscoveryResponse` a REST EDS server answers with.

    `version_info` is the decision's revision, so Envoy's ACK names what it applied.
    """
    d = as_decision(decision)
    cla = envoy_cla(d, service, addresses)
    return {
        "version_info": str(d.revision),
        "resources": [{"@type": ENVOY_CLA_TYPE, **cla}],
        "type_url": ENVOY_CLA_TYPE,
    }
