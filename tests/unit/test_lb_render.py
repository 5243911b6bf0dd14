"""Load balancer renderers, map files, HAProxy state parsing and the decision follower.

The renderers are pure, so their output is checked byte for byte for known decisions;
the safety rule (never every server of a backend out) is also checked as a property
over random decisions. The follower is run against fake agents (small aiohttp servers)
that answer the way real ones can: a newer revision, an older one, a stale one, nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.client.follower import DecisionFollower
from controlplane.errors import ConfigError, NotFound, RenderError
from controlplane.formats import (
    ENVOY_CLA_TYPE,
    NoServingRegion,
    ServerSetting,
    envoy_cla,
    envoy_discovery_response,
    haproxy_commands,
    haproxy_plan,
    nginx_upstream,
)
from controlplane.lb.haproxy import ServerState, commands_for_drift, parse_servers_state
from controlplane.lb.mapfile import load_haproxy_map, load_nginx_map
from controlplane.lb.nginx import placeholders, render_template
from controlplane.model import Decision, decision_from_json

REGIONS = ("cn-east", "cn-south", "cn-north")
SERVERS = {
    "cn-east": ("be_order", "east"),
    "cn-south": ("be_order", "south"),
    "cn-north": ("be_order", "north"),
}
ADDRESSES = {"cn-east": "10.1.0.10:8080", "cn-south": "10.2.0.10:8080", "cn-north": "[fd00::3]:8080"}


def decision(revision: int = 42, **placements: tuple[int, str]) -> dict[str, Any]:
    """A decision in the served JSON shape; keyword names use _ for - (cn_east)."""
    return {
        "revision": revision,
        "term": 3,
        "committed_at": "2026-11-27T10:00:00.123Z",
        "leader": "agent-east-1",
        "panic": False,
        "frozen": False,
        "shed_fraction": 0.0,
        "services": {
            "order": {
                name.replace("_", "-"): {"weight": weight, "state": state}
                for name, (weight, state) in placements.items()
            }
        },
        "features": {"comments": True},
        "reasons": [],
    }


EAST_DOWN = decision(cn_east=(0, "down"), cn_south=(60, "healthy"), cn_north=(40, "healthy"))
ALL_UP = decision(7, cn_east=(40, "healthy"), cn_south=(33, "healthy"), cn_north=(27, "healthy"))


# -- HAProxy ---------------------------------------------------------------------------


def test_haproxy_commands_for_a_region_down() -> None:
    assert haproxy_commands(EAST_DOWN, "order", SERVERS) == (
        "set server be_order/south weight 60\n"
        "set server be_order/south state ready\n"
        "set server be_order/north weight 40\n"
        "set server be_order/north state ready\n"
        "set server be_order/east state maint\n"
        "set server be_order/east weight 0\n"
    )


def test_haproxy_drained_is_maint_degraded_keeps_its_weight_and_zero_weight_stays_ready() -> None:
    d = decision(cn_east=(0, "drained"), cn_south=(80, "healthy"), cn_north=(20, "degraded"))
    assert haproxy_commands(d, "order", SERVERS).splitlines() == [
        "set server be_order/south weight 80",
        "set server be_order/south state ready",
        "set server be_order/north weight 20",
        "set server be_order/north state ready",
        "set server be_order/east state maint",
        "set server be_order/east weight 0",
    ]
    held_back = decision(cn_east=(0, "healthy"), cn_south=(100, "healthy"), cn_north=(0, "down"))
    assert haproxy_commands(held_back, "order", SERVERS).splitlines()[2:] == [
        "set server be_order/east weight 0",
        "set server be_order/east state ready",
        "set server be_order/north state maint",
        "set server be_order/north weight 0",
    ]


def test_haproxy_never_takes_every_server_of_a_backend_out() -> None:
    all_out = decision(cn_east=(0, "down"), cn_south=(0, "drained"), cn_north=(0, "healthy"))
    plan = haproxy_plan(all_out, "order", SERVERS)
    assert plan.held == ("be_order",)
    assert plan.commands == ()
    assert any("leaves no server of be_order serving" in n and "kept as it is" in n for n in plan.notes)
    with pytest.raises(NoServingRegion) as e:
        haproxy_commands(all_out, "order", SERVERS)
    assert e.value.http_status == 409


def test_haproxy_holds_only_the_backend_that_would_go_dark() -> None:
    servers = {"cn-east": ("be_a", "east"), "cn-south": ("be_b", "south"), "cn-north": ("be_b", "north")}
    plan = haproxy_plan(EAST_DOWN, "order", servers)
    assert plan.held == ("be_a",)
    assert [s.name for s in plan.settings] == ["be_b/south", "be_b/north"]


def test_haproxy_unmapped_and_unknown_regions() -> None:
    servers = {"cn-south": ("be_order", "south"), "cn-west": ("be_order", "west")}
    plan = haproxy_plan(EAST_DOWN, "order", servers)
    assert [(s.name, s.weight, s.ready) for s in plan.settings] == [
        ("be_order/south", 60, True),
        ("be_order/west", 0, False),
    ]
    assert "cn-east: in the decision but not mapped to an HAProxy server" in plan.notes
    with pytest.raises(NotFound):
        haproxy_plan(EAST_DOWN, "payments", SERVERS)


def test_the_model_and_its_json_shape_render_the_same() -> None:
    model = decision_from_json(EAST_DOWN)
    assert isinstance(model, Decision)
    assert haproxy_commands(model, "order", SERVERS) == haproxy_commands(EAST_DOWN, "order", SERVERS)
    assert nginx_upstream(model, "order", ADDRESSES) == nginx_upstream(EAST_DOWN, "order", ADDRESSES)
    assert envoy_cla(model, "order", ADDRESSES) == envoy_cla(EAST_DOWN, "order", ADDRESSES)


# -- nginx -----------------------------------------------------------------------------


def test_nginx_upstream_for_a_region_down() -> None:
    assert nginx_upstream(EAST_DOWN, "order", ADDRESSES) == (
        "# controlplane: service order\n"
        "upstream order {\n"
        "    server 10.1.0.10:8080 down;  # cn-east down\n"
        "    server 10.2.0.10:8080 weight=60;  # cn-south healthy\n"
        "    server [fd00::3]:8080 weight=40;  # cn-north healthy\n"
        "}\n"
    )


def test_nginx_zero_weight_and_unknown_regions_are_down_and_params_are_kept() -> None:
    d = decision(cn_east=(0, "healthy"), cn_south=(100, "healthy"), cn_north=(0, "drained"))
    text = nginx_upstream(
        d, "order", {**ADDRESSES, "cn-west": "10.4.0.10:80"}, name="order_be", server_params="max_fails=0"
    )
    assert text.splitlines()[1:] == [
        "upstream order_be {",
        "    server 10.1.0.10:8080 max_fails=0 down;  # cn-east healthy, weight 0",
        "    server 10.2.0.10:8080 max_fails=0 weight=100;  # cn-south healthy",
        "    server [fd00::3]:8080 max_fails=0 down;  # cn-north drained",
        "    server 10.4.0.10:80 max_fails=0 down;  # cn-west not in decision",
        "}",
    ]


def test_nginx_never_renders_an_upstream_with_every_server_down() -> None:
    all_out = decision(cn_east=(0, "down"), cn_south=(0, "down"), cn_north=(0, "drained"))
    with pytest.raises(NoServingRegion) as e:
        nginx_upstream(all_out, "order", ADDRESSES)
    assert "revision 42 leaves no server of upstream order serving" in e.value.detail


# -- Envoy -----------------------------------------------------------------------------


def test_envoy_cluster_load_assignment_shape() -> None:
    cla = envoy_cla(EAST_DOWN, "order", ADDRESSES)
    assert cla == {
        "cluster_name": "order",
        "endpoints": [
            {
                "locality": {"region": "cn-south"},
                "load_balancing_weight": 60,
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "10.2.0.10", "port_value": 8080}}
                        },
                        "health_status": "HEALTHY",
                    }
                ],
            },
            {
                "locality": {"region": "cn-north"},
                "load_balancing_weight": 40,
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "fd00::3", "port_value": 8080}}
                        },
                        "health_status": "HEALTHY",
                    }
                ],
            },
        ],
    }


def test_envoy_discovery_response_wraps_the_assignment() -> None:
    response = envoy_discovery_response(ALL_UP, "order", ADDRESSES)
    assert response["version_info"] == "7"
    assert response["type_url"] == ENVOY_CLA_TYPE
    [resource] = response["resources"]
    assert resource["@type"] == ENVOY_CLA_TYPE
    assert [e["load_balancing_weight"] for e in resource["endpoints"]] == [40, 33, 27]
    all_out = decision(cn_east=(0, "down"), cn_south=(0, "down"), cn_north=(0, "down"))
    with pytest.raises(NoServingRegion):
        envoy_cla(all_out, "order", ADDRESSES)


# -- the safety rule over random decisions --------------------------------------------

STATES = st.sampled_from(["healthy", "degraded", "down", "drained"])


@st.composite
def random_decisions(draw: Callable[..., Any]) -> dict[str, Any]:
    weights = draw(st.lists(st.integers(0, 100), min_size=3, max_size=3))
    states = draw(st.lists(STATES, min_size=3, max_size=3))
    return decision(
        draw(st.integers(1, 10_000)),
        **{r.replace("-", "_"): (w, s) for r, w, s in zip(REGIONS, weights, states, strict=True)},
    )


@settings(max_examples=300, deadline=None)
@given(random_decisions())
def test_no_renderer_ever_takes_every_server_out(d: dict[str, Any]) -> None:
    placements = d["services"]["order"]
    serving = {r for r, p in placements.items() if p["weight"] > 0 and p["state"] in ("healthy", "degraded")}
    plan = haproxy_plan(d, "order", SERVERS)
    if serving:
        assert plan.held == ()
        assert {s.region for s in plan.settings if s.serving} == serving
        first_idle = next((i for i, s in enumerate(plan.settings) if not s.serving), len(plan.settings))
        assert all(s.serving for s in plan.settings[:first_idle])
        assert not any(s.serving for s in plan.settings[first_idle:])
        text = nginx_upstream(d, "order", ADDRESSES)
        assert text.count(" weight=") == len(serving)
        weights = [e["load_balancing_weight"] for e in envoy_cla(d, "order", ADDRESSES)["endpoints"]]
        assert len(weights) == len(serving) and min(weights) >= 1
    else:
        assert plan.held == ("be_order",) and plan.commands == ()
        for render in (nginx_upstream, envoy_cla):
            with pytest.raises(NoServingRegion):
                render(d, "order", ADDRESSES)


# -- map files and templates -----------------------------------------------------------


def test_haproxy_map_file(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("order: {backend: be_order, servers: {cn-east: east, cn-south: south}}\n")
    assert load_haproxy_map(path) == {
        "order": {"cn-east": ("be_order", "east"), "cn-south": ("be_order", "south")}
    }
    path.write_text(
        "order: {backend: be_order, servers: {cn-east: 'a b'}, weight: 3}\n"
        "inventory: {backend: be_order, servers: {}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_haproxy_map(path, ("order", "inventory", "gateway"))
    assert [p.removeprefix(f"{path}: ") for p in e.value.problems] == [
        "--service gateway: not in the map file (known: order, inventory)",
        "order.weight: unknown key (allowed: backend, servers)",
        "order.servers.cn-east: must be a name without spaces, slashes or quotes (got 'a b')",
        "inventory.backend: already used by service order (got 'be_order')",
        "inventory.servers: must map regions to servers (got {})",
    ]


def test_nginx_map_file(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("order: {servers: {cn-east: '127.0.0.1:80'}, server_params: max_fails=0}\n")
    [up] = load_nginx_map(path).values()
    assert (up.upstream, dict(up.addresses), up.server_params) == (
        "order",
        {"cn-east": "127.0.0.1:80"},
        "max_fails=0",
    )
    path.write_text("order: {upstream: 'x y', servers: {cn-east: nowhere}, server_params: 'down'}\n")
    with pytest.raises(ConfigError) as e:
        load_nginx_map(path)
    assert len(e.value.problems) == 3
    assert f"{path}: order.servers.cn-east: must be host:port (got 'nowhere')" in e.value.problems


def test_template_placeholders_are_replaced_at_their_indentation() -> None:
    template = "http {\n    # controlplane:upstream order\n    server { listen 80; }\n}\n"
    assert placeholders(template) == ["order"]
    out = render_template(template, {"order": "upstream order {\n    server a:1 weight=5;\n}\n"})
    assert (
        out
        == "http {\n    upstream order {\n        server a:1 weight=5;\n    }\n    server { listen 80; }\n}\n"
    )
    with pytest.raises(RenderError, match="inventory: service not in the map file"):
        render_template(template + "# controlplane:upstream inventory\n", {"order": "x"})


# -- HAProxy's `show servers state` ----------------------------------------------------

SHOW_SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state \
srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl \
srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 be_order 1 east 127.0.0.1 0 1 40 1 0 1 0 0 0 0 0 0 - 19101 - 0 0 - - 0
3 be_order 2 south 127.0.0.1 2 4 1 1 0 1 0 0 8 0 0 0 - 19201 - 0 0 - - 0

"""


def test_parse_servers_state_and_drift() -> None:
    live = parse_servers_state(SHOW_SERVERS_STATE)
    east, south = live[("be_order", "east")], live[("be_order", "south")]
    assert (east.weight, east.maint, south.weight, south.maint) == (40, True, 1, False)
    # east is in maint at weight 40: coming back needs both commands, in order.
    assert commands_for_drift(ServerSetting("cn-east", "be_order", "east", 40, True), east) == (
        "set server be_order/east state ready",
    )
    assert commands_for_drift(ServerSetting("cn-east", "be_order", "east", 55, True), east) == (
        "set server be_order/east weight 55",
        "set server be_order/east state ready",
    )
    assert commands_for_drift(ServerSetting("cn-south", "be_order", "south", 0, False), south) == (
        "set server be_order/south state maint",
        "set server be_order/south weight 0",
    )
    in_place = ServerState("be_order", "south", 60, 0, 2)
    assert commands_for_drift(ServerSetting("cn-south", "be_order", "south", 60, True), in_place) == ()


# -- the follower against fake agents -------------------------------------------------


class FakeAgent:
    """Answers /v1/decision like an agent: blocking on ?index=, optionally stale or down."""

    def __init__(self, revision: int, stale: bool = False) -> None:
        self.revision = revision
        self.stale = stale
        self.down = False
        self.queries = 0
        self.changed = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/decision", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def publish(self, revision: int) -> None:
        self.revision = revision
        self.changed.set()
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.queries += 1
        if self.down:
            return web.json_response({"error": "no decision yet"}, status=503)
        index = int(request.query.get("index", "0"))
        if self.revision <= index:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
        headers = {"X-Controlplane-Stale": "12.0"} if self.stale else {}
        body = decision(self.revision, cn_east=(50, "healthy"), cn_south=(50, "healthy"))
        return web.json_response(body, headers=headers)


@pytest.fixture
async def agents() -> AsyncIterator[list[FakeAgent]]:
    made: list[FakeAgent] = []
    yield made
    for a in made:
        await a.stop()


async def start_agents(made: list[FakeAgent], *revisions: int) -> list[FakeAgent]:
    for r in revisions:
        a = FakeAgent(r)
        await a.start()
        made.append(a)
    return made


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_follower_applies_new_revisions_and_never_goes_back(agents: list[FakeAgent]) -> None:
    first, second = await start_agents(agents, 5, 3)
    applied: list[int] = []

    async def apply(d: Decision) -> None:
        applied.append(d.revision)

    follower = DecisionFollower([first.url, second.url], apply, wait_s=1.0, retry_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await eventually(lambda: applied == [5], "revision 5")
        first.down = True  # the follower moves to the second agent, which lags at 3
        await eventually(lambda: second.queries >= 2, "queries to the lagging agent")
        assert applied == [5] and follower.applied_revision == 5
        second.publish(6)
        await eventually(lambda: applied == [5, 6], "revision 6 from the second agent")
    finally:
        stop.set()
        await task


async def test_follower_keeps_the_last_state_when_no_agent_answers(agents: list[FakeAgent]) -> None:
    [only] = await start_agents(agents, 2)
    applied: list[int] = []

    async def apply(d: Decision) -> None:
        applied.append(d.revision)

    follower = DecisionFollower([only.url, "http://127.0.0.1:9"], apply, wait_s=1.0, retry_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await eventually(lambda: applied == [2], "revision 2")
        only.down = True
        await eventually(lambda: follower.following.misses >= 4, "several failed rounds")
        assert applied == [2] and follower.applied_revision == 2
        assert follower.last_error is not None
        only.down = False
        only.publish(3)
        await eventually(lambda: applied == [2, 3], "revision 3 once an agent answers again")
    finally:
        stop.set()
        await task


async def test_follower_leaves_a_stale_agent_and_retries_a_failed_apply(agents: list[FakeAgent]) -> None:
    stale, fresh = await start_agents(agents, 4, 9)
    stale.stale = True
    attempts: list[int] = []

    async def apply(d: Decision) -> None:
        attempts.append(d.revision)
        if len(attempts) == 2:
            raise RuntimeError("load balancer busy")

    follower = DecisionFollower([stale.url, fresh.url], apply, wait_s=1.0, retry_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await eventually(lambda: follower.applied_revision == 9, "revision 9 from the fresh agent")
        assert attempts == [4, 9, 9]  # the failed apply of 9 was retried
    finally:
        stop.set()
        await task
