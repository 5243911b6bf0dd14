"""cpctl with tokens of too small a scope: refused in one line before any plan is shown.

A cluster of its own (named tokens: an operator, an LB adapter's), cpctl as a process.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from controlplane.testing.localcluster import LocalCluster
from tests.cli.conftest import CPCTL, Live, cli_config

# No token of scope read: reads stay open, so the harness (which reads without a token)
# can watch the cluster; `lb` is the scope below operate that a person might hold wrongly.
TOKENS = {"adapter": "adapter-secret-0123456789", "ops": "ops-secret-0123456789"}


@pytest.fixture(scope="module")
def scoped() -> Iterator[LocalCluster]:
    config = cli_config()
    config["auth"] = {
        "tokens": [
            {"name": "root", "scope": "admin", "secret": {"env": "CONTROLPLANE_ADMIN_TOKEN"}},
            {"name": "adapter", "scope": "lb", "secret": {"env": "ADAPTER_TOKEN"}},
            {"name": "ops", "scope": "operate", "secret": {"env": "OPS_TOKEN"}},
        ]
    }
    # The backends are simulated on the cluster's own loop, which runs in a thread (Live).
    live = Live(config)
    live.cluster.extra_env = {"ADAPTER_TOKEN": TOKENS["adapter"], "OPS_TOKEN": TOKENS["ops"]}
    try:
        live.start()
        yield live.cluster
    except BaseException:
        print(live.logs())
        raise
    finally:
        live.stop()


def cpctl(cluster: LocalCluster, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
    env |= {"CPCTL_ENDPOINT": ",".join(a.url for a in cluster.agents.values()), "CPCTL_TOKEN": token}
    return subprocess.run(
        [CPCTL, *args], env={**env, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("token", "args", "needs"),
    [
        ("adapter", ("drain", "cn-east", "-r", "x", "--yes"), "operate"),
        ("adapter", ("drill", "cn-east", "--duration", "1m", "-r", "x", "--yes"), "operate"),
        ("ops", ("freeze", "-r", "x", "--yes"), "admin"),
    ],
)
def test_a_token_of_too_small_a_scope_is_refused_before_the_plan(
    scoped: LocalCluster, token: str, args: tuple[str, ...], needs: str
) -> None:
    done = cpctl(scoped, TOKENS[token], *args)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"token {token} has scope" in line and f"needs {needs}" in line, done.stderr
    assert "Plan" not in done.stdout + done.stderr  # nobody was shown a plan to confirm
    # And a read is fine with the same token.
    assert cpctl(scoped, TOKENS[token], "intents").returncode == 0


def test_a_token_with_the_scope_acts(scoped: LocalCluster) -> None:
    done = cpctl(scoped, TOKENS["ops"], "feature", "disable", "likes", "-r", "scoped test", "--yes")
    assert done.returncode == 0, done.stderr
    undone = cpctl(scoped, TOKENS["ops"], "feature", "enable", "likes", "-r", "scoped test", "--yes")
    assert undone.returncode == 0, undone.stderr
