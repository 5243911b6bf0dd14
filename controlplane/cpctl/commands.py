"""cpctl's read commands: status, regions, weights, history, intents, observations, watch.

Each reads one or two routes of the HTTP API. With `-o json` it prints the API's
answer as it came (status, which needs two routes, prints both under `cluster` and
`decision`); otherwise it draws a table with `render`.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from typing import Any

import click

from controlplane.client.following import Following, Served
from controlplane.cpctl import complete, render
from controlplane.cpctl.errors import CpctlError, Refused
from controlplane.cpctl.follow import follow as follow_decisions
from controlplane.cpctl.http import Client
from controlplane.cpctl.options import CpctlGroup, Settings, command, global_options
from controlplane.cpctl.when import parse_moment

WATCH_WAIT_S = 30

pass_settings = click.make_pass_decorator(Settings, ensure=True)


def emit_json(data: Any) -> None:
    click.echo(render.json_safe(json.dumps(data, indent=2, ensure_ascii=False)))


@click.group(
    cls=CpctlGroup,
    params=global_options(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 done, 1 refused by the agent (its reason is shown), 2 usage error, "
    "3 no agent reachable. Environment: CPCTL_ENDPOINT, CPCTL_TOKEN, CPCTL_TOKEN_FILE.",
)
@click.version_option(package_name="controlplane", prog_name="cpctl")
def cli() -> None:
    """Look at and steer a controlplane cluster through any of its agents.

    Read commands print tables, or the API's JSON with -o json. Commands that change
    traffic show their plan and ask before committing (--yes skips the question,
    --dry-run stops after the plan); every change needs a --reason, and is recorded
    with who made it.
    """


@command(cli, "status")
@pass_settings
def status(settings: Settings) -> None:
    """The whole picture: cluster, weights, reasons, load balancers.

    The cluster as the agent asked sees it (leader, members and whether they are
    connected, term, quorum), then the decision it serves: revision and age, weight and
    state per service and region, features off, shedding, panic, frozen, stale, and the
    reasons for all of it; then the load balancers that report to it (what each applied,
    how far behind, when it last reported, its state and error), when any does.

    With -o json: {"cluster": GET /v1/cluster, "decision": GET /v1/decision, "members":
    each member's own GET /v1/cluster, "lbs": GET /v1/lbs (null from an agent without
    that route)}.
    """
    client = settings.client()
    # The decision first: it moves the client to an agent with quorum when there is one.
    decision = client.get("/v1/decision").body
    cluster = client.get("/v1/cluster").body
    lbs = lb_reports(client)
    views = member_views(client, cluster)
    if settings.json:
        emit_json({"cluster": cluster, "decision": decision, "members": views, "lbs": lbs})
        return
    render.make_console().print(render.status(cluster, decision, time.time(), views, lbs))


def lb_reports(client: Client) -> Any:
    """GET /v1/lbs from the agent that served the decision; None from an agent without it."""
    try:
        return client.get("/v1/lbs").body
    except Refused as e:
        if e.status == 404:
            return None
        raise


MEMBER_VIEW_TIMEOUT_S = 2.0


def member_views(client: Client, cluster: dict[str, Any]) -> dict[str, Any]:
    """Every member's own /v1/cluster, asked in parallel with a short timeout (or why not)."""
    scheme = client.endpoint.split("://", 1)[0]
    targets = {str(m["id"]): f"{scheme}://{m['http']}" for m in cluster.get("members", []) if m.get("http")}

    def ask(endpoint: str) -> Any:
        try:
            r = client.get_from(endpoint, "/v1/cluster", None, MEMBER_VIEW_TIMEOUT_S)
        except CpctlError as e:
            return f"not answering ({e.message.split(': ', 1)[-1]})"
        return r.body if r.status == 200 and isinstance(r.body, dict) else f"answered {r.status}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        answers = dict(zip(targets, pool.map(ask, targets.values()), strict=True))
    return answers


@command(cli, "regions")
@pass_settings
def regions(settings: Settings) -> None:
    """Regions: agents, capacity, weights, states, verdicts."""
    body = settings.client().get("/v1/regions").body
    if settings.json:
        emit_json(body)
        return
    render.make_console().print(render.regions(body))


@command(cli, "weights")
@click.argument("service", required=False, shell_complete=complete.services)
@pass_settings
def weights(settings: Settings, service: str | None) -> None:
    """The weights in force, of one SERVICE or of every service.

    With SERVICE, -o json prints GET /v1/weights/SERVICE. Without, it prints
    {"revision", "stale", "services": {SERVICE: <the same shape>}}, built from one
    decision so that every service is shown at the same revision.
    """
    client = settings.client()
    if service is not None:
        body = client.get(f"/v1/weights/{service}", {"format": "json"}).body
    else:
        decision = client.get("/v1/decision").body
        body = {
            "revision": decision["revision"],
            "stale": decision.get("stale", False),
            "services": {
                name: {
                    "service": name,
                    "revision": decision["revision"],
                    "weights": {r: p["weight"] for r, p in placements.items()},
                    "states": {r: p["state"] for r, p in placements.items()},
                    "stale": decision.get("stale", False),
                }
                for name, placements in decision["services"].items()
            },
        }
    if settings.json:
        emit_json(body)
        return
    render.make_console().print(render.weights_view(body, service))


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_moment(value, time.time())
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


@command(cli, "history")
@click.option(
    "-n", "--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Entries to show."
)
@click.option(
    "--before",
    metavar="WHEN",
    callback=_moment,
    help="Only entries older than this (to page back): Unix seconds, a duration ago (2h, 30m) "
    "or an ISO 8601 time (2026-11-27T10:00:00Z; UTC when it has no offset).",
)
@pass_settings
def history(settings: Settings, limit: int, before: float | None) -> None:
    """Decisions and intents, newest first.

    \b
    Examples:
      cpctl history --before 2h
      cpctl history --before 2026-11-27T10:00:00Z -n 50
    """
    query = {"limit": str(limit)}
    if before is not None:
        query["before"] = repr(before)
    body = settings.client().get("/v1/history", query).body
    if settings.json:
        emit_json(body)
        return
    render.make_console().print(render.history(body))


@command(cli, "intents")
@pass_settings
def intents(settings: Settings) -> None:
    """Standing operator intents, with their ids (for `intent rm`)."""
    body = settings.client().get("/v1/intents").body
    if settings.json:
        emit_json(body)
        return
    render.make_console().print(render.intents(body, time.time()))


@command(cli, "observations")
@pass_settings
def observations(settings: Settings) -> None:
    """What each agent's probes see, per region and service.

    These are the inputs of the verdicts: a region is down only when a quorum of fresh
    observers says so.
    """
    body = settings.client().get("/v1/observations").body
    if settings.json:
        emit_json(body)
        return
    render.make_console().print(render.observations(body))


@command(cli, "watch")
@click.option(
    "-c",
    "--count",
    type=click.IntRange(min=1),
    help="Exit after this many new revisions (the current one, shown first, does not count).",
)
@pass_settings
def watch(settings: Settings, count: int | None) -> None:
    """Follow the decision live, revision by revision.

    The current decision is shown first, then each new revision as it is committed.
    Uses blocking queries (GET /v1/decision?index=N), so it moves to another agent when
    the one it follows goes away and never shows an older revision. With -o json it
    prints one decision per line. Ctrl-C stops it.
    """
    try:
        follow(settings, count)
    except KeyboardInterrupt:
        sys.stderr.write("\n")  # Ctrl-C is how a watch ends: exit 0


def follow(settings: Settings, count: int | None) -> None:
    client = settings.client()
    console = render.make_console()
    previous: dict[str, Any] | None = None
    seen = 0
    gap = Gap()
    for served in follow_decisions(client, wait_s=WATCH_WAIT_S, on_miss=gap.missed):
        gap.ended(served)
        decision = dict(served.body)
        if settings.json:
            click.echo(render.json_safe(json.dumps(decision, ensure_ascii=False)))
        else:
            console.print(render.watch_line(previous, decision, time.time()))
        sys.stdout.flush()
        if previous is not None:
            seen += 1
            if count is not None and seen >= count:
                return
        previous = decision


class Gap:
    """Says once on stderr when the followed agents stop answering, and once when one is back."""

    def __init__(self) -> None:
        self.since: float | None = None

    def missed(self, following: Following) -> None:
        if self.since is None:
            self.since = time.monotonic()
            click.echo(render.printable(f"cpctl: {following.last_error}; still trying"), err=True)

    def ended(self, served: Served) -> None:
        if self.since is not None:
            self.since = None
            click.echo(render.printable(f"cpctl: reached {served.agent} again"), err=True)


def current_decision(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/v1/decision").body
    return body
