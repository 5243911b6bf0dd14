"""Given real agents and a real nginx driven by `controlplane lb nginx`, traffic follows.

The adapter renders the `upstream order` block into nginx's configuration, tests it
with `nginx -t` and reloads. nginx does not retry another server here
(`proxy_next_upstream off`, `max_fails=0`), so whatever moves traffic is the adapter.

A drain issued with `cpctl` moving traffic through both load balancers is in
`test_lb_cpctl.py`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.lb_fixtures import (
    Adapter,
    Nginx,
    StartCluster,
    Traffic,
    agent_args,
    assert_split,
    backend_addresses,
    eventually,
    failover_and_recovery,
    latest,
    lb_config,
    order_weights,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


def nginx_adapter(workdir: Path, agents: list[str], nginx: Nginx, *extra: str) -> Adapter:
    args = [
        *agents,
        "--template",
        str(nginx.template),
        "--output",
        str(nginx.config),
        "--map",
        str(nginx.map_file()),
        "--test-cmd",
        shlex.join(nginx.args("-t")),
        "--reload-cmd",
        shlex.join(nginx.args("-s", "reload")),
        "--check-interval",
        "0.5",
        *extra,
    ]
    return Adapter("nginx", workdir, args)


async def test_traffic_through_nginx_follows_failover_and_recovery(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config())
    nginx = Nginx(tmp_path, backend_addresses(c))
    await nginx.start()
    adapter = nginx_adapter(tmp_path, agent_args(c), nginx)
    try:
        adapter.start()
        await failover_and_recovery(c, nginx.url, adapter, measure, "nginx")
        assert "upstream order {" in nginx.config.read_text()
    finally:
        await adapter.stop()
        await nginx.stop()


async def test_an_invalid_template_leaves_the_running_config_in_force(
    cluster: StartCluster, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config())
    nginx = Nginx(tmp_path, backend_addresses(c))
    await nginx.start()
    adapter = nginx_adapter(tmp_path, agent_args(c), nginx)
    try:
        adapter.start()
        healthy = await latest(c)
        await adapter.applied(int(healthy["revision"]), "the healthy decision")
        weights = order_weights(healthy)
        good_config = nginx.config.read_bytes()
        assert b"weight=40;" in good_config, good_config.decode()
        pid = nginx.master_pid()

        # An operator breaks the template. The adapter sees the change, renders, and
        # nginx -t refuses the result: the previous file must be back, nginx not reloaded.
        broken_at = time.monotonic()
        template = nginx.template.read_text()
        nginx.template.write_text(
            template.replace("access_log off;", "access_log off;\n    no_such_directive on;")
        )

        async def reported() -> dict[str, object] | None:
            adapter.check_alive()
            s = adapter.status()
            return s if s.get("ok") is False and "config test failed" in str(s.get("error")) else None

        status = await eventually(reported, "the adapter to report the failed config test")
        measure(f"nginx: broken template -> error reported in {time.monotonic() - broken_at:.2f} s")
        assert "no_such_directive" in str(status["error"]), status
        # Revisions committed meanwhile (same weights) may count as applied; none is lost.
        assert int(status["applied_revision"]) >= int(healthy["revision"]), status
        assert nginx.config.read_bytes() == good_config, "the previous configuration was not restored"
        assert "config test failed" in adapter.log()
        assert nginx.master_pid() == pid and nginx.proc is not None and nginx.proc.poll() is None

        # nginx still serves, with the upstream it had.
        async with Traffic(nginx.url) as traffic:
            assert_split(await traffic.window(3), weights, "nginx after the failed render")
        assert nginx.config.read_bytes() == good_config
        assert adapter.status().get("ok") is False  # no retry loop turned it green by itself

        # Fixing the template makes the adapter render and reload again.
        nginx.template.write_text(template)

        async def recovered() -> bool:
            adapter.check_alive()
            return bool(adapter.status().get("ok"))

        await eventually(recovered, "the adapter to apply again once the template is fixed")
        assert nginx.config.read_bytes() == good_config
    finally:
        await adapter.stop()
        await nginx.stop()
