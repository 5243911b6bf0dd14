"""The LB adapters take agent URLs as cpctl does: repeated, comma- or space-separated, checked at start."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from controlplane.cli import _agent_urls, main
from controlplane.testing.ports import free_port


def test_agent_urls_split_on_commas_and_spaces_and_drop_duplicates() -> None:
    got = _agent_urls(
        click.Context(click.Command("x")),
        click.Option(["--agent"]),
        ("http://10.0.0.1:8700, http://10.0.0.2:8700", "https://a.example:8700/ http://10.0.0.1:8700"),
    )
    assert got == ("http://10.0.0.1:8700", "http://10.0.0.2:8700", "https://a.example:8700")


@pytest.mark.parametrize(
    "bad",
    ["10.0.0.1:8700", "ftp://10.0.0.1:8700", "http://user:pw@10.0.0.1:8700", "http://10.0.0.1:99999", ","],
)
def test_a_bad_agent_url_stops_the_adapter_at_start_naming_it(bad: str, tmp_path: object) -> None:
    result = CliRunner().invoke(
        main,
        ["lb", "haproxy", "--agent", bad, "--socket", "/nonexistent.sock", "--map", "/nonexistent.yaml"],
        env={"CONTROLPLANE_AGENTS": None},
    )
    assert result.exit_code == 2, result.output
    assert "--agent" in result.output and "Traceback" not in result.output


def test_once_gives_up_after_its_timeout_saying_so(tmp_path: Path) -> None:
    mapping = tmp_path / "map.yaml"
    mapping.write_text("order: {backend: be_order, servers: {cn-east: east}}\n")
    dead = f"http://127.0.0.1:{free_port()}"  # reserved here, so nothing listens on it
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("controlplane")), "lb", "haproxy", "--agent", dead,
         "--socket", str(tmp_path / "none.sock"), "--map", str(mapping), "--once", "--once-timeout", "1.5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "no decision applied within 1.5 s (--once-timeout)" in done.stderr, done.stderr
    assert time.monotonic() - started < 30  # not the old fixed 60 s
