"""Configuration: the examples load, and mistakes are reported all at once with paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import SecretRef, load_settings, parse_settings
from controlplane.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))

MINIMAL = """
cluster:
  agents:
    - {id: a1, region: cn-east, raft: "127.0.0.1:7701", http: "127.0.0.1:8701"}
regions:
  cn-east:
    capacity_rps: 100
    services:
      order: {targets: ["http://127.0.0.1:9101/healthz"]}
"""


def _problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    return e.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_loads(path: Path) -> None:
    settings = load_settings(path)
    assert settings.policy.regions
    assert settings.policy.services
    for agent in settings.cluster.agents:
        assert agent.region in settings.regions


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "production.yaml"}


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    s = load_settings(tmp_path / "c.yaml")
    assert s.policy.min_healthy_regions == 1
    assert s.model.probes.fall == 3
    assert s.model.backend.kind == "raft"
    assert s.policy.region("cn-east").base_weight == {"order": 100.0}


def test_several_mistakes_are_all_reported_with_paths(tmp_path: Path) -> None:
    problems = _problems(
        """
cluster:
  agents:
    - {id: a1, region: cn-west, raft: "127.0.0.1:99999", http: "127.0.0.1:8701"}
    - {id: a1, region: cn-east, raft: "127.0.0.1:7702", http: "127.0.0.1:8701"}
regions:
  cn-east:
    capacity_rps: -5
    services:
      order: {targets: ["ftp://x"]}
policy:
  ramp_steps: [0.5, 0.25]
  demand_rps: {orders: 100}
features:
  comments: {level: 0, saves: 2}
""",
        tmp_path,
    )
    expected = [
        "cluster.agents[0].raft: must be host:port with a port between 1 and 65535 (got '127.0.0.1:99999')",
        "cluster.agents[0].region: not a region in regions (got 'cn-west')",
        "cluster.agents[1].id: same as cluster.agents[0] (got 'a1')",
        "cluster.agents[1].http: same as cluster.agents[0] (got '127.0.0.1:8701')",
        "regions.cn-east.capacity_rps: input should be greater than 0 (got -5)",
        "policy.ramp_steps: must increase and end at 1.0 (got [0.5, 0.25])",
        "policy.demand_rps.orders: not a service of any region (got 'orders')",
        "features.comments.level: input should be greater than or equal to 1 (got 0)",
        "features.comments.saves: input should be less than or equal to 1 (got 2)",
    ]
    for line in expected:
        assert line in problems
    assert any(
        p.startswith("regions.cn-east.services.order.targets[0].url: must be http://") for p in problems
    )
    assert len(problems) == len(expected) + 1, problems


def test_unknown_keys_are_errors_not_ignored(tmp_path: Path) -> None:
    problems = _problems(MINIMAL + "policy:\n  recovery_hold: 30\nprobe:\n  fall: 2\n", tmp_path)
    assert problems == ["policy.recovery_hold: unknown key (got 30)", "probe: unknown key (got {'fall': 2})"]


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    problems = _problems(MINIMAL + "policy:\n  recovery_hold_s: 30\n  recovery_hold_s: 5\n", tmp_path)
    assert len(problems) == 1 and "duplicate key 'recovery_hold_s'" in problems[0]
    assert problems[0].startswith("line 12 column 3:")


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    problems = _problems("cluster: [\n", tmp_path)
    assert problems[0].startswith("line 2 column 1:")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as e:
        parse_settings(["not", "a", "mapping"])
    assert e.value.problems == ["(top level): must be a mapping of sections (got ['not', 'a', 'mapping'])"]


def test_missing_sections_are_named(tmp_path: Path) -> None:
    problems = _problems("log_level: info\n", tmp_path)
    assert problems == ["cluster: required but missing", "regions: required but missing"]


def test_raft_timings_are_checked(tmp_path: Path) -> None:
    problems = _problems(
        MINIMAL + "backend:\n  raft: {election_timeout_min_s: 0.1, election_timeout_max_s: 0.05,"
        " heartbeat_s: 0.05}\n",
        tmp_path,
    )
    assert "backend.raft.election_timeout_max_s: must exceed election_timeout_min_s (got 0.05)" in problems
    assert "backend.raft.heartbeat_s: must be below election_timeout_min_s / 3 (got 0.05)" in problems


def test_etcd_backend_needs_its_section(tmp_path: Path) -> None:
    problems = _problems(MINIMAL + "backend:\n  kind: etcd\n", tmp_path)
    assert problems == ["backend.etcd: required when backend.kind is etcd (got nothing)"]


def test_weights_must_be_set_everywhere_or_nowhere(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "regions:\n",
        "regions:\n  cn-west:\n    capacity_rps: 50\n    weight: 3\n    services:\n"
        '      order: {targets: ["tcp://127.0.0.1:9201"]}\n',
    )
    problems = _problems(text, tmp_path)
    assert problems == [
        "regions.cn-east.services.order.weight: set a weight in every region running order or in none "
        "(got none here, but cn-west set one)"
    ]


def test_secret_comes_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_TEST_SECRET", "s3cret-of-20-bytes!")
    assert SecretRef(env="CP_TEST_SECRET").resolve("cluster.secret") == "s3cret-of-20-bytes!"
    f = tmp_path / "secret"
    f.write_text("from-file-at-least-16\n")
    assert SecretRef(file=f).resolve("cluster.secret") == "from-file-at-least-16"
    monkeypatch.delenv("CP_TEST_SECRET")
    with pytest.raises(ConfigError) as e:
        SecretRef(env="CP_TEST_SECRET").resolve("cluster.secret")
    assert e.value.problems == ["cluster.secret.env: environment variable CP_TEST_SECRET is not set or empty"]
    problems = _problems(MINIMAL + "auth:\n  admin_token: {env: A, file: /x}\n", tmp_path)
    assert problems == ["auth.admin_token: give exactly one of env or file (got {'env': 'A', 'file': '/x'})"]


def test_settings_are_immutable(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    s = load_settings(tmp_path / "c.yaml")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error or dataclass's
        s.model.policy.min_healthy_regions = 5  # type: ignore[misc]


# -- issue 13: settings the decision safety rules need, and configs that cannot work ------


def test_policy_knows_every_agent_and_its_home_region(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    s = load_settings(tmp_path / "c.yaml")
    assert s.policy.observers == {"a1": "cn-east"}
    production = load_settings(ROOT / "config" / "production.yaml").policy
    assert production.observers == {
        "agent-east-1": "cn-east",
        "agent-east-2": "cn-east",
        "agent-south-1": "cn-south",
        "agent-south-2": "cn-south",
        "agent-north-1": "cn-north",
    }


def test_new_policy_settings_have_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    p = load_settings(tmp_path / "c.yaml").policy
    assert (p.panic_below, p.degraded_margin) == (1, 0.2)
    # Derived from the probes: one interval plus one timeout (1.0 + 0.8 by default).
    assert p.panic_correlation_s == 1.8


def test_panic_correlation_follows_the_slowest_target_unless_set(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'order: {targets: ["http://127.0.0.1:9101/healthz"]}',
        'order: {targets: ["http://127.0.0.1:9101/healthz", {url: "tcp://127.0.0.1:9102", interval_s: 2, '
        "timeout_s: 1.5}]}",
    )
    (tmp_path / "c.yaml").write_text(text)
    assert load_settings(tmp_path / "c.yaml").policy.panic_correlation_s == 3.5
    (tmp_path / "c.yaml").write_text(text + "policy:\n  panic_correlation_s: 0.5\n")
    assert load_settings(tmp_path / "c.yaml").policy.panic_correlation_s == 0.5


def test_panic_below_and_degraded_margin_are_checked(tmp_path: Path) -> None:
    problems = _problems(MINIMAL + "policy:\n  panic_below: 2\n  degraded_margin: 1\n", tmp_path)
    assert problems == [
        "policy.degraded_margin: input should be less than 1 (got 1)",
        "policy.panic_below: more than the 1 regions configured (got 2)",
    ]
    problems = _problems(MINIMAL + "policy:\n  panic_below: 0\n", tmp_path)
    assert problems == ["policy.panic_below: input should be greater than or equal to 1 (got 0)"]


def test_a_probe_interval_longer_than_the_observation_ttl_is_refused(tmp_path: Path) -> None:
    problems = _problems(MINIMAL + "probes:\n  interval_s: 15\npolicy:\n  observation_ttl_s: 5\n", tmp_path)
    assert (
        "probes.interval_s: observations would expire between probes: policy.observation_ttl_s 5 must "
        "exceed 1.5 x (interval_s 15 + timeout_s 0.8 + 1 s to commit) = 25.2 s (got 15)"
    ) in problems


def test_a_per_target_interval_is_checked_too(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'order: {targets: ["http://127.0.0.1:9101/healthz"]}',
        'order: {targets: [{url: "http://127.0.0.1:9101/healthz", interval_s: 15}]}',
    )
    problems = _problems(text, tmp_path)
    assert problems == [
        "regions.cn-east.services.order.targets[0].interval_s: a failure takes fall 3 x interval_s 15 + "
        "timeout_s 0.8 + 1 s to commit = 46.8 s to act on, more than policy.failover_budget_s 30 (got 15)",
        "regions.cn-east.services.order.targets[0].interval_s: observations would expire between probes: "
        "policy.observation_ttl_s 10 must exceed 1.5 x (interval_s 15 + timeout_s 0.8 + 1 s to commit) "
        "= 25.2 s (got 15)",
    ]


def test_detection_slower_than_the_failover_budget_is_refused(tmp_path: Path) -> None:
    problems = _problems(
        MINIMAL + "probes:\n  interval_s: 2.9\n  fall: 10\npolicy:\n  failover_budget_s: 30\n", tmp_path
    )
    assert problems == [
        "probes.interval_s: a failure takes fall 10 x interval_s 2.9 + timeout_s 0.8 + 1 s to commit "
        "= 30.8 s to act on, more than policy.failover_budget_s 30 (got 2.9)"
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("x", "at least 16 bytes"),
        ("CHANGE-ME-cluster-secret", "placeholder"),
        ("please-changeme-now-123", "placeholder"),
    ],
)
def test_weak_secrets_are_refused_with_their_field_and_never_shown(
    value: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_TEST_SECRET", value)
    with pytest.raises(ConfigError) as refused:
        SecretRef(env="CP_TEST_SECRET").resolve("cluster.secret")
    (problem,) = refused.value.problems
    assert problem.startswith("cluster.secret.env: ") and why in problem
    assert value not in problem


def test_a_strong_secret_from_a_file_is_read_and_a_binary_file_refused(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_text("3f9c1d0e8b7a6f5e4d3c2b1a\n")
    assert SecretRef(file=good).resolve("auth.admin_token") == "3f9c1d0e8b7a6f5e4d3c2b1a"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00" * 10)
    with pytest.raises(ConfigError) as refused:
        SecretRef(file=binary).resolve("auth.admin_token")
    assert refused.value.problems == [f"auth.admin_token.file: not UTF-8 text ({binary})"]
