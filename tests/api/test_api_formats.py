"""GET /v1/weights/{service}?format=...: each rendering is accepted by the real thing.

The HAProxy commands go through a real HAProxy's runtime socket, the nginx block passes
`nginx -t` inside a test config, and the Envoy answer has ClusterLoadAssignment's shape.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from controlplane.errors import RuntimeApiError
from controlplane.lb.haproxy import RuntimeApi
from controlplane.testing.inprocess import InProcessCluster
from tests.acceptance.lb_fixtures import NGINX_TEMPLATE, eventually, free_port, require_binary

pytestmark = [pytest.mark.acceptance, pytest.mark.asyncio(loop_scope="module")]


async def text_of(cluster: InProcessCluster, agent: str, path: str) -> tuple[int, str, dict[str, str]]:
    async with cluster.session.get(cluster.agents[agent].url + path) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_haproxy_format_is_accepted_by_a_real_runtime_socket(
    cluster: InProcessCluster, agents: list[str], tmp_path: Path
) -> None:
    haproxy = require_binary("haproxy", "haproxy")
    status, _, regions = await cluster.get(agents[0], "/v1/regions")
    assert status == 200
    addresses = {r["name"]: r["services"]["order"]["address"] for r in regions["regions"]}
    sock = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    lines = [
        "global",
        f"    stats socket {sock} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 5s",
        "    timeout server 5s",
        "frontend fe",
        f"    bind 127.0.0.1:{free_port()}",
        "    default_backend order",
        "backend order",
    ] + [f"    server {region} {address} weight 1" for region, address in addresses.items()]
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started, not waited for
        [haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        api = RuntimeApi(sock, timeout_s=2.0)

        async def answering() -> bool:
            try:
                return "Name: HAProxy" in await api.command("show info")
            except RuntimeApiError:
                return False

        await eventually(answering, "HAProxy's runtime API")
        status, text, _ = await text_of(cluster, agents[0], "/v1/weights/order?format=haproxy")
        assert status == 200, text
        commands = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        assert commands and all(c.startswith("set server order/") for c in commands), text
        for command in commands:
            answer = await api.command(command)
            assert answer.strip() == "", f"HAProxy refused {command!r}: {answer}"
        status, _, weights = await cluster.get(agents[0], "/v1/weights/order")
        state = await api.servers_state()
        for region, weight in weights["weights"].items():
            assert state[("order", region)].weight == weight, (region, state)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)


async def test_nginx_format_passes_nginx_t(
    cluster: InProcessCluster, agents: list[str], tmp_path: Path
) -> None:
    nginx = require_binary("nginx", "nginx")
    status, block, _ = await text_of(cluster, agents[1], "/v1/weights/order?format=nginx")
    assert status == 200, block
    assert "upstream order {" in block
    (tmp_path / "tmp").mkdir()
    conf = NGINX_TEMPLATE.format(prefix=tmp_path, port=free_port()).replace(
        "# controlplane:upstream order", block
    )
    (tmp_path / "nginx.conf").write_text(conf)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            nginx,
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "error.log"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def test_envoy_format_has_the_shape_of_a_cluster_load_assignment(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    status, _, cla = await cluster.get(agents[2], "/v1/weights/order?format=envoy")
    assert status == 200
    assert cla["cluster_name"] == "order"
    _, _, weights = await cluster.get(agents[2], "/v1/weights/order")
    serving = {r for r, w in weights["weights"].items() if w > 0}
    assert {e["locality"]["region"] for e in cla["endpoints"]} >= serving
    for e in cla["endpoints"]:
        assert set(e) >= {"locality", "lb_endpoints"}
        if e["locality"]["region"] in serving:
            assert e["load_balancing_weight"] == weights["weights"][e["locality"]["region"]]
        for lb in e["lb_endpoints"]:
            sa = lb["endpoint"]["address"]["socket_address"]
            assert isinstance(sa["address"], str) and 0 < sa["port_value"] < 65536
