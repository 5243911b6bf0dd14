"""Named tokens in the configuration: parsed, resolved, checked, and shown by check-config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.access import Scope
from controlplane.config import load_settings
from controlplane.daemon import resolve_tokens
from controlplane.errors import ConfigError

BASE = """
cluster:
  secret: {env: CP_T_CLUSTER}
  agents:
    - {id: a1, region: cn-east, raft: "127.0.0.1:7701", http: "127.0.0.1:8701"}
regions:
  cn-east:
    capacity_rps: 100
    services:
      order: {targets: ["http://127.0.0.1:9101/healthz"]}
"""

NAMED = (
    BASE
    + """
auth:
  tokens:
    - {name: alice, scope: operate, secret: {env: CP_T_ALICE}}
    - {name: haproxy-east, scope: lb, secret: {file: SECRET_FILE}}
    - {name: grafana, scope: read, secret: {env: CP_T_GRAFANA}}
"""
)

GOOD = {
    "CP_T_CLUSTER": "cluster-secret-0123456789",
    "CP_T_ALICE": "alice-secret-0123456789",
    "CP_T_GRAFANA": "grafana-secret-0123456789",
}


@pytest.fixture
def named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CONTROLPLANE_ADMIN_TOKEN", raising=False)
    secret = tmp_path / "lb-token"
    secret.write_text("lb-secret-0123456789\n")
    path = tmp_path / "c.yaml"
    path.write_text(NAMED.replace("SECRET_FILE", str(secret)))
    return path


def test_named_tokens_resolve_with_their_scopes_and_no_default_admin(named: Path) -> None:
    tokens = resolve_tokens(load_settings(named))
    assert [(t.name, t.scope) for t in tokens.entries] == [
        ("alice", Scope.OPERATE),
        ("haproxy-east", Scope.LB),
        ("grafana", Scope.READ),
    ]
    lb = tokens.match(b"lb-secret-0123456789")
    assert lb is not None and lb.name == "haproxy-east"
    assert not tokens.reads_open


def test_every_weak_missing_or_shared_secret_is_named_at_once(
    named: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_T_ALICE", "CHANGE-ME-alice-token")
    monkeypatch.setenv("CP_T_GRAFANA", "lb-secret-0123456789")  # the LB token's secret
    monkeypatch.delenv("CP_T_CLUSTER")
    with pytest.raises(ConfigError) as refused:
        resolve_tokens(load_settings(named))
    problems = refused.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("cluster.secret.env: environment variable CP_T_CLUSTER")
    assert problems[1].startswith("auth.tokens[0].secret.env: is a placeholder")
    assert problems[2] == "auth.tokens[2].secret: same secret as auth.tokens[1] (each token needs its own)"
    assert not any("lb-secret" in p or "CHANGE-ME-alice" in p for p in problems)


def test_token_names_are_unique_and_do_not_shadow_the_legacy_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        BASE
        + """
auth:
  admin_token: {env: X}
  tokens:
    - {name: admin, scope: read, secret: {env: A}}
    - {name: bob, scope: operate, secret: {env: B}}
    - {name: bob, scope: superuser, secret: {env: C}}
    - {name: "Bad Name", scope: read, secret: {env: D}}
"""
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    problems = refused.value.problems
    assert "auth.tokens[0].name: same name as auth.admin_token (got 'admin')" in problems
    assert "auth.tokens[2].name: same name as auth.tokens[1] (got 'bob')" in problems
    assert any(p.startswith("auth.tokens[2].scope: input should be 'read', 'lb'") for p in problems), problems
    assert any(p.startswith("auth.tokens[3].name: string should match pattern") for p in problems), problems


def test_check_config_resolves_the_tokens_and_names_them(named: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "check-config", "-c", str(named)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "tokens: alice (operate), haproxy-east (lb), grafana (read); reads need a token" in done.stdout
    assert "secret-0123456789" not in done.stdout + done.stderr


def test_check_config_fails_on_a_weak_token(named: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_T_GRAFANA", "short")
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "check-config", "-c", str(named)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
        check=False,
    )
    assert done.returncode == 2, done
    assert "auth.tokens[2].secret.env: must be at least 16 bytes (got 5 bytes)" in done.stderr
    assert "Traceback" not in done.stderr
