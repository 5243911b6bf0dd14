"""Prometheus targets in the configuration: what they become, and mistakes at their field paths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import load_settings, parse_settings
from controlplane.errors import ConfigError
from controlplane.probes import probe_targets
from controlplane.promql import Condition

ROOT = Path(__file__).resolve().parents[2]
WHERE = "regions.cn-east.services.order"

BASE: dict[str, Any] = {
    "cluster": {
        "agents": [{"id": "a1", "region": "cn-east", "raft": "127.0.0.1:7701", "http": "127.0.0.1:8701"}]
    },
    "probes": {"prometheus": {"servers": ["http://127.0.0.1:9090"]}},
    "regions": {
        "cn-east": {
            "capacity_rps": 100,
            "services": {
                "order": {
                    "address": "127.0.0.1:9101",
                    "targets": [
                        {
                            "prometheus": {
                                "down": {
                                    "query": 'min(up{job="order"})',
                                    "when": "== 0",
                                    "for_s": 15,
                                    "name": "up",
                                },
                                "utilization": {"query": "max(mem_used / mem_limit)"},
                            },
                            "fall": 1,
                        }
                    ],
                }
            },
        }
    },
}


def config(**changes: Any) -> dict[str, Any]:
    """BASE with `changes` merged into the order service's first target's `prometheus`."""
    out = copy.deepcopy(BASE)
    out["regions"]["cn-east"]["services"]["order"]["targets"][0]["prometheus"].update(changes)
    return out


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_settings(raw)
    return e.value.problems


def test_the_example_has_the_seeds_two_rules() -> None:
    settings = load_settings(ROOT / "config" / "prometheus.yaml")
    targets = {(t.region, t.service): t for t in probe_targets(settings) if t.kind == "prometheus"}
    order = targets[("cn-east", "order")].prometheus
    assert order is not None
    assert order.down_when == Condition("==", 0.0) and order.down_for_s == 15.0
    assert order.servers == ("http://prometheus-a.internal:9090", "http://prometheus-b.internal:9090")
    assert order.utilization_query is not None and "process_memory_limit_bytes" in order.utilization_query
    assert settings.policy.utilization_high == 0.8
    assert order.describe_down() == "prometheus: up == 0 for 15 s"
    inventory = targets[("cn-east", "inventory")].prometheus
    assert inventory is not None and inventory.slow_query is not None
    assert settings.regions["cn-east"].services["order"].data_address() == "order.cn-east.internal:8080"


def test_a_prometheus_target_becomes_a_probe_target() -> None:
    (target,) = probe_targets(parse_settings(BASE))
    assert (target.kind, target.fall, target.url) == ("prometheus", 1, None)
    assert target.prometheus is not None
    assert target.prometheus.servers == ("http://127.0.0.1:9090",)
    assert target.prometheus.down_query == 'min(up{job="order"})'
    assert target.address == 'promql:min(up{job="order"})'


def test_a_targets_own_servers_win() -> None:
    (target,) = probe_targets(parse_settings(config(servers=["http://p1:9090", "https://p2/prom"])))
    assert target.prometheus is not None and target.prometheus.servers == (
        "http://p1:9090",
        "https://p2/prom",
    )


def test_a_broken_query_is_reported_at_its_field_path() -> None:
    raw = config(
        down={"query": "sum(rate(x[1m])", "when": "> 0.1"},
        slow={"query": 'histogram_quantile(0.99, rate(x{a="b}[1m]))'},
    )
    found = problems(raw)
    assert any(
        p.startswith(
            f"{WHERE}.targets[0].prometheus.down.query: not a valid PromQL query: unclosed '(' opened"
        )
        for p in found
    ), found
    assert any(
        p.startswith(
            f"{WHERE}.targets[0].prometheus.slow.query: not a valid PromQL query: unterminated string"
        )
        for p in found
    ), found


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"down": {"query": "up", "when": "is zero"}}, "prometheus.down.when", "must be a comparison"),
        (
            {"down": {"query": "up", "when": "== 0", "for_s": -1}},
            "prometheus.down.for_s",
            "greater than or equal",
        ),
        ({"down": {"query": "up"}}, "prometheus.down.when", "required but missing"),
        ({"down": {"query": "", "when": "== 0"}}, "prometheus.down.query", "must not be empty"),
        ({"servers": ["ftp://x"]}, "prometheus.servers", "must be http://host:port"),
        ({"bogus": 1}, "prometheus.bogus", "unknown key"),
    ],
)
def test_mistakes_are_named_by_field(change: dict[str, Any], path: str, words: str) -> None:
    found = problems(config(**change))
    assert any(p.startswith(f"{WHERE}.targets[0].{path}") and words in p for p in found), found


def test_servers_are_needed_from_somewhere() -> None:
    raw = config()
    del raw["probes"]["prometheus"]
    assert (
        f"{WHERE}.targets[0].prometheus.servers: required here or in probes.prometheus.servers (got none)"
        in (problems(raw))
    )


def test_a_service_probed_only_through_prometheus_needs_an_address() -> None:
    raw = config()
    del raw["regions"]["cn-east"]["services"]["order"]["address"]
    assert any(
        p.startswith(f"{WHERE}.address: required when every target is a prometheus probe")
        for p in problems(raw)
    )


def test_a_target_is_a_url_or_a_prometheus_probe_not_both() -> None:
    raw = config()
    raw["regions"]["cn-east"]["services"]["order"]["targets"][0]["url"] = "http://127.0.0.1:9101/healthz"
    assert any("give exactly one of url or prometheus" in p for p in problems(raw))


def test_the_hold_counts_toward_the_failover_budget() -> None:
    raw = config(down={"query": "up", "when": "== 0", "for_s": 40})
    found = problems(raw)
    assert any(
        p.startswith(
            f"{WHERE}.targets[0].prometheus.down.for_s: a failure takes for_s 40 + fall 1 x interval_s 1"
        )
        and "more than policy.failover_budget_s 30 (got 40)" in p
        for p in found
    ), found


def test_shed_fraction_is_not_a_feature_name() -> None:
    raw = copy.deepcopy(BASE)
    raw["features"] = {"shed_fraction": {"level": 2}}
    assert (
        "features.shed_fraction: the name is taken by the shed fraction's feature flag (got 'shed_fraction')"
        in (problems(raw))
    )
