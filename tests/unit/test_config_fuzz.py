"""Config errors are always one line per problem: never a traceback, a hang or a start.

100 mutated files once gave 15 accepted bad files, 7-11 tracebacks, 3 hangs (a 2 KB
alias bomb reached 1.97 GB) and 8 agents that started on a bad file. Here: the known
cases one by one, then a seeded mutator over the example configs through the real
`check-config`, and a few refused files given to the real `agent`.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from controlplane.cli import main
from controlplane.testing.localcluster import remap_ports

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
HEADER = re.compile(r"^controlplane: .+: (\d+) problem\(s\), nothing started:$")
PROBLEM = re.compile(r"^  \S.*?: \S.*$")

pytestmark = pytest.mark.timeout(300)


def check(text: str | bytes, tmp_path: Path, name: str = "c.yaml") -> tuple[int, list[str]]:
    """Run check-config (in this process) on `text`: exit code and the problem lines."""
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    result = CliRunner().invoke(main, ["check-config", "--no-secrets", "--promtool", "off", "-c", str(path)])
    assert time.monotonic() - started < 20, "check-config took too long"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"check-config raised {result.exception!r}:\n{result.output}")
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return 0, []
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    match = HEADER.match(lines[0])
    assert match is not None, lines
    problems = lines[1:]
    assert len(problems) == int(match.group(1)), lines
    for line in problems:
        assert PROBLEM.match(line), f"not one `path: problem` line: {line!r}"
        assert len(line) < 600, line
    return 2, [line.strip() for line in problems]


def demo_text(**changes: Any) -> str:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for dotted, value in changes.items():
        where = config
        *path, last = dotted.split("__")
        for key in path:
            where = where[int(key)] if isinstance(where, list) else where[key.replace("_", "-")]
        where[last] = value
    return yaml.safe_dump(config, sort_keys=False)


BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BOMB, "YAML: more than 100000 values once aliases are expanded"),
        ("a: &a [*a]\n", "line 1: an alias refers to itself"),
        ("x: " + "[" * 3000 + "]" * 3000, "nested deeper than 40 levels"),
        (b"cluster: {name: \xff\xfe}\n", "line 1: not UTF-8 text (byte 0xff)"),
        ("? [a, b]\n: 1\n", "a key must be a plain value, not a list"),
        ("? {a: 1}\n: 1\n", "a key must be a plain value, not a mapping"),
        ("cluster: {}\ncluster: {}\n", "duplicate key 'cluster'"),
        ("- just\n- a list\n", "(top level): must be a mapping"),
        (demo_text(cluster__agents__0__raft="127.0.0.1:8701"), "cluster.agents[0].http: same port as cluster.agents[0].raft"),  # noqa: E501
        (demo_text(probes__fall=True), "probes.fall: input should be a valid integer (got True)"),
        (demo_text(policy__observation_ttl_s="10"), "policy.observation_ttl_s: input should be a valid number"),  # noqa: E501
        (demo_text(regions__cn_east__capacity_rps=False), "regions.cn-east.capacity_rps: input should be a valid number"),  # noqa: E501
        (demo_text(backend={"kind": "raft", "raft": {"heartbeat_s": 0.005}}), "backend.raft.tick_s: must not exceed heartbeat_s"),  # noqa: E501
        (demo_text(auth={"open_reads": "yes"}), "auth.open_reads: input should be a valid boolean"),
    ],
)  # fmt: skip
def test_each_known_bad_file_is_one_line_per_problem(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    code, problems = check(text, tmp_path)
    assert code == 2
    assert any(expected in p for p in problems), problems


def mutate(rng: random.Random, data: Any) -> tuple[Any, str]:
    """One random change somewhere in `data`: what to write, and what was done."""
    paths: list[list[Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(data, [])
    path = rng.choice(paths[1:])
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    replacements: list[Any] = [
        True, False, None, 0, -1, 1e308, float("nan"), 10**30, "", "x" * 5000, "CHANGE-ME", "a b; }",
        "127.0.0.1:8701", [], {}, [1, 2], {"k": "v"}, "1.5", "\x00\x1b[2J", "ünïcödé", 3.5, -0.0,
    ]  # fmt: skip
    action = rng.choice(["replace", "delete", "duplicate", "rename"])
    if action == "delete" and isinstance(parent, dict):
        del parent[last]
    elif action == "rename" and isinstance(parent, dict):
        parent[f"{last}_typo"] = parent.pop(last)
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[last])
    else:
        action = "replace"
        parent[last] = rng.choice(replacements)
    return data, f"{action} {'.'.join(map(str, path))}"


def test_a_hundred_mutated_examples_never_give_a_traceback_or_a_hang(tmp_path: Path) -> None:
    rng = random.Random(19)
    refused = 0
    for i in range(100):
        source = rng.choice(EXAMPLES)
        data, what = mutate(rng, yaml.safe_load(source.read_text()))
        if rng.random() < 0.1:
            text = yaml.safe_dump(data)[: rng.randrange(1, 400)]  # cut short
            what += ", truncated"
        else:
            text = yaml.safe_dump(data, allow_unicode=True)
        try:
            code, _ = check(text, tmp_path, f"m{i}.yaml")
        except AssertionError as e:
            raise AssertionError(f"mutation {i} of {source.name} ({what}): {e}") from None
        refused += code == 2
    assert refused >= 60, f"only {refused} of 100 mutated files refused"


def test_an_agent_never_starts_on_a_file_check_config_refuses(tmp_path: Path) -> None:
    config = remap_ports(yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    config["data_dir"] = str(tmp_path / "data")
    agent = config["cluster"]["agents"][0]
    bad = [
        {**config, "probes": {**config.get("probes", {}), "fall": True}},
        {**config, "backend": {"kind": "raft", "raft": {"heartbeat_s": 0.005}}},
        {**config, "cluster": {**config["cluster"], "agents": [{**agent, "http": agent["raft"]}]}},
    ]
    env = {
        **os.environ,
        "CONTROLPLANE_CLUSTER_SECRET": "cluster-secret-0123456789",
        "CONTROLPLANE_ADMIN_TOKEN": "admin-token-0123456789",
    }
    for i, data in enumerate(bad):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        checked = subprocess.run(
            [sys.executable, "-m", "controlplane", "check-config", "-c", str(path)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        started = subprocess.run(
            [sys.executable, "-m", "controlplane", "agent", "-c", str(path), "--id", agent["id"]],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert checked.returncode == 2, (i, checked.stderr)
        assert started.returncode == 2, (i, started.stderr)
        assert "nothing started" in started.stderr and "Traceback" not in started.stderr
        assert not (tmp_path / "data").exists(), i
