"""Shell completion of region, service and feature names, asked of the agents.

click's own mechanism (`_CPCTL_COMPLETE=bash_source cpctl` prints the script to source;
see the README) calls these while the operator presses Tab, so they ask an agent with
a short timeout and, when none answers or the answer is refused, suggest nothing
rather than print an error into the middle of a command line.
"""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem

from controlplane.cpctl.errors import CpctlError
from controlplane.cpctl.http import Client
from controlplane.cpctl.options import Settings

COMPLETE_TIMEOUT_S = 1.0


def _ask(ctx: click.Context, path: str) -> Any:
    """The body of GET `path` from the endpoints the command line names so far; None if none answers."""
    settings = ctx.find_object(Settings) or Settings()
    try:
        client = Client(
            settings.resolved_endpoints(),
            token=settings.token(),
            timeout_s=COMPLETE_TIMEOUT_S,
            notice=lambda _line: None,  # nothing on the terminal while the operator types
        )
        return client.get(path).body
    except CpctlError:
        return None


def _items(names: list[str], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def regions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    body = _ask(ctx, "/v1/regions")
    names = [str(r.get("name")) for r in (body or {}).get("regions", []) if isinstance(r, dict)]
    return _items(names, incomplete)


def services(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    body = _ask(ctx, "/v1/regions")
    names: list[str] = []
    for region in (body or {}).get("regions", []):
        for service in region.get("services", {}) if isinstance(region, dict) else ():
            if service not in names:
                names.append(str(service))
    return _items(names, incomplete)


def features(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    body = _ask(ctx, "/v1/features")
    return _items([str(n) for n in (body or {}).get("features", {})], incomplete)
