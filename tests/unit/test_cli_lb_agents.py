"""The LB adapters take agent URLs as cpctl does: repeated, comma- or space-separated, checked at start."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from controlplane.cli import _agent_urls, main


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
