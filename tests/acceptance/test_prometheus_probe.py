"""Health from metrics: agents probe through a real Prometheus scraping the simulated backends.

Debian's `/usr/bin/prometheus` runs on loopback with a temporary config and data dir,
scraping every simulated backend's `/metrics` every 0.5 s; the three agents are real
processes whose only probes are PromQL queries against it:

- `order` and `inventory`: down when the error ratio over 2 s is above 0.5 for 1 s,
  utilization from memory used / limit, latency from the p99 of a histogram;
- `gateway`: down when `min(up)` is 0 for 1 s (the seed's `up == 0` rule, shortened).

A missing Prometheus fails these tests (it is a Debian package the Makefile installs);
it never skips them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.testing.localcluster import LocalCluster, service_address
from controlplane.testing.ports import free_port
from controlplane.testing.prometheuslocal import LocalPrometheus, ScrapeTarget
from tests.acceptance.conftest import (
    BASE_WEIGHTS,
    READY_TIMEOUT_S,
    Recorder,
    StartCluster,
    fast_config,
    wait_all,
    weights,
)

pytestmark = [pytest.mark.acceptance]

ROOT = Path(__file__).resolve().parents[2]

SCRAPE_INTERVAL_S = 0.5


def metrics_config(server: str) -> dict[str, Any]:
    """The demo deployment on free ports, every service probed through Prometheus only."""
    config = fast_config()
    for region, rc in config["regions"].items():
        for service, sc in rc["services"].items():
            sel = f'region="{region}", service="{service}"'
            if service == "gateway":
                down = {"name": "up", "query": f"min(up{{{sel}}})", "when": "== 0", "for_s": 1}
            else:
                down = {
                    "name": "error ratio",
                    "query": (
                        f'sum(rate(http_requests_total{{{sel}, code="503"}}[2s]))'
                        f" / sum(rate(http_requests_total{{{sel}}}[2s]))"
                    ),
                    "when": "> 0.5",
                    "for_s": 1,
                }
            sc["address"] = service_address(sc)
            sc["targets"] = [
                {
                    "prometheus": {
                        "down": down,
                        "utilization": {
                            "query": f"max(process_resident_memory_bytes{{{sel}}}"
                            f" / process_memory_limit_bytes{{{sel}}})"
                        },
                        "slow": {
                            "query": "histogram_quantile(0.99, sum by (le) "
                            f"(rate(http_request_duration_seconds_bucket{{{sel}}}[2s])))"
                        },
                    }
                }
            ]
    config["probes"]["prometheus"] = {"servers": [server]}
    return config


def scrape_targets(config: dict[str, Any]) -> list[ScrapeTarget]:
    return [
        ScrapeTarget(region, service, service_address(sc))
        for region, rc in config["regions"].items()
        for service, sc in rc["services"].items()
    ]


@pytest.fixture
async def metrics_world(cluster: StartCluster) -> AsyncIterator[tuple[LocalCluster, LocalPrometheus]]:
    port = free_port()
    config = metrics_config(f"http://127.0.0.1:{port}")
    prometheus = LocalPrometheus(scrape_targets(config), scrape_interval_s=SCRAPE_INTERVAL_S, port=port)
    try:

        async def scraped_before_agents(c: LocalCluster) -> None:
            await prometheus.start()
            # Every backend scraped, twice (a rate needs two samples), before anyone probes.
            await prometheus.wait_for_series("up == 1", len(c.backends), timeout_s=60)
            await prometheus.wait_for_series(
                'rate(http_requests_total{code="200"}[2s]) > 0', len(c.backends), 60
            )

        c = await cluster(config, before_agents=scraped_before_agents)
        await wait_all(c, all_serving, "every region serving", timeout_s=READY_TIMEOUT_S)
        yield c, prometheus
    finally:
        await prometheus.close()


def all_serving(d: dict[str, Any]) -> bool:
    return all(p["weight"] > 0 for s in d["services"].values() for p in s.values())


def state(service: str, region: str, expected: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d["services"][service][region]["state"] == expected


def reason(d: dict[str, Any], prefix: str) -> str:
    found = [r for r in d["reasons"] if r.startswith(prefix)]
    assert found, f"no reason starting {prefix!r} in {d['reasons']}"
    return found[0]


async def test_a_rising_error_ratio_takes_the_region_out_by_a_quorum_of_observers(
    metrics_world: tuple[LocalCluster, LocalPrometheus], measure: Callable[[str], None]
) -> None:
    c, _ = metrics_world
    started = time.monotonic()
    await c.set_backend("cn-east", "order", error_ratio=0.9)
    seen = await wait_all(c, state("order", "cn-east", "down"), "cn-east/order down on every agent")
    measure(f"error ratio 0.9 to cn-east/order out on every agent: {time.monotonic() - started:.1f} s")
    for d in seen.values():
        assert d["services"]["order"]["cn-east"]["weight"] == 0
        assert re.fullmatch(
            r"cn-east/order down: [23] of 3 observers report prometheus: error ratio > 0\.5 for 1 s "
            r"\(quorum 2 of 3 configured\)",
            reason(d, "cn-east/order down"),
        )
        # Only the pair whose metrics went bad: cn-east still serves its other services.
        assert d["services"]["inventory"]["cn-east"]["weight"] > 0
        assert sum(weights(d, "order").values()) == 100

    async def every_observer_sees_it_down() -> bool:
        status, _, body = await c.get(next(iter(c.agents)), "/v1/observations")
        views = [o for o in body["observations"] if (o["region"], o["service"]) == ("cn-east", "order")]
        return status == 200 and len(views) == 3 and all(not o["up"] for o in views)

    await c.wait_for(every_observer_sees_it_down, 20, "the third observer to see it down too")

    await c.set_backend("cn-east", "order", error_ratio=0.0)
    await wait_all(
        c,
        lambda d: d["services"]["order"]["cn-east"]["weight"] == BASE_WEIGHTS["cn-east"],
        "cn-east/order back at its base weight after the hold and ramp",
    )


async def test_memory_past_the_threshold_degrades_the_region(
    metrics_world: tuple[LocalCluster, LocalPrometheus], measure: Callable[[str], None]
) -> None:
    c, _ = metrics_world
    started = time.monotonic()
    await c.set_backend("cn-south", "inventory", utilization=0.95)
    seen = await wait_all(c, state("inventory", "cn-south", "degraded"), "cn-south/inventory degraded")
    measure(f"memory 95% to cn-south/inventory degraded on every agent: {time.monotonic() - started:.1f} s")
    for d in seen.values():
        assert "median utilization high (above 0.8 to degrade, below 0.64 to restore)" in reason(
            d, "cn-south/inventory degraded"
        )
        w = weights(d, "inventory")
        assert 0 < w["cn-south"] < BASE_WEIGHTS["cn-south"], w
        assert d["services"]["order"]["cn-south"]["state"] == "healthy"

    await c.set_backend("cn-south", "inventory", utilization=0.7)  # between 0.64 and 0.8: stays
    await c.set_backend("cn-south", "inventory", utilization=0.3)
    await wait_all(c, state("inventory", "cn-south", "healthy"), "cn-south/inventory restored")


async def test_prometheus_stopped_makes_the_probes_inconclusive_and_moves_no_traffic(
    metrics_world: tuple[LocalCluster, LocalPrometheus], measure: Callable[[str], None]
) -> None:
    c, prometheus = metrics_world
    before = await wait_all(c, all_serving, "every region serving")
    outcome = {a: d["services"] for a, d in before.items()}
    async with Recorder(c, interval_s=0.1) as recorder:
        stopped = time.monotonic()
        await prometheus.stop()
        # A real fault that only Prometheus could have shown: nobody can tell now.
        await c.set_backend("cn-east", "order", error_ratio=0.9)
        said = await wait_all(
            c,
            lambda d: any("prometheus unreachable: inconclusive" in r for r in d["reasons"]),
            "the reasons to say the probes are inconclusive",
        )
        measure(f"Prometheus stopped to 'inconclusive' in the reasons: {time.monotonic() - stopped:.1f} s")
        for d in said.values():
            assert (
                "cn-east/order: 3 of 3 observers' probes are inconclusive "
                "(prometheus unreachable: inconclusive), 0 up and 0 down, quorum 2 of 3 configured: "
                "keeping it up"
            ) in d["reasons"]
        status, _, body = await c.get(next(iter(c.agents)), "/v1/observations")
        assert status == 200
        fresh = [o for o in body["observations"] if o["fresh"]]
        assert fresh and all(o["inconclusive"] == "prometheus unreachable: inconclusive" for o in fresh)
        # Hold a while longer: still nothing moves.
        await c.wait_for(_after(time.monotonic() + 5.0), 10, "five more seconds")
    served = [s for s in recorder.samples if s.decision is not None and s.at >= stopped]
    assert served, "the agents kept answering"
    moved = [s for s in served if s.decision and s.decision["services"] != outcome[s.agent]]
    assert not moved, f"traffic moved while Prometheus was gone: {moved[0]}"

    # Prometheus back: the fault it now sees is acted on.
    await prometheus.start()
    back = time.monotonic()
    await wait_all(c, state("order", "cn-east", "down"), "cn-east/order down once Prometheus is back")
    measure(f"Prometheus restarted to the hidden fault acted on: {time.monotonic() - back:.1f} s")


def _after(deadline: float) -> Callable[[], Any]:
    async def passed() -> bool:
        return time.monotonic() >= deadline

    return passed


def test_check_config_parses_every_query_with_promtool(tmp_path: Path) -> None:
    """`check-config` hands the queries to Debian's promtool, which knows PromQL's grammar."""
    from controlplane.probes.promtool import find_promtool

    if find_promtool() is None:
        pytest.fail("promtool is not installed: apt-get install -y prometheus")
    controlplane = str(Path(sys.executable).with_name("controlplane"))
    ok = subprocess.run(
        [controlplane, "check-config", "--no-secrets", "-c", str(ROOT / "config" / "prometheus.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "10 PromQL queries parsed by" in ok.stdout

    config = metrics_config("http://127.0.0.1:9090")
    order = config["regions"]["cn-east"]["services"]["order"]["targets"][0]["prometheus"]
    order["down"]["query"] = "nosuchfunc(up)"  # balanced, so only a real parser can tell
    order["slow"]["query"] = "rate(x[5m]) by (le)"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    bad = subprocess.run(
        [controlplane, "check-config", "--no-secrets", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    where = "regions.cn-east.services.order.targets[0].prometheus"
    assert (
        f'{where}.down.query: promtool: 1:1: parse error: unknown function with name "nosuchfunc"'
        in bad.stderr
    )
    assert f"{where}.slow.query: promtool: " in bad.stderr
    skipped = subprocess.run(
        [controlplane, "check-config", "--no-secrets", "-c", str(path), "--promtool", "off"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert skipped.returncode == 0, "without promtool only the lexical check runs, and it passes"
