"""cpctl's commands that change traffic, and `plan`, which only asks what would.

Every action goes the same way: build the intent body of `POST /v1/intents`, check that
the write can succeed at all (the agent has quorum and the token's scope allows it:
`GET /v1/whoami`), so that nobody confirms a plan only to be refused; ask the agent for
the plan with that intent (`POST /v1/plan`, which commits nothing), show it,
ask for confirmation (unless --yes; --dry-run stops here), commit it, then wait with
blocking queries until the agent serves a decision that carries the intent, and show
that. When cpctl returns 0 the change is in force on the agent it talked to.

A confirmation is never asked of something that is not a terminal: a script that
forgot --yes gets a usage error at once instead of hanging on a prompt nobody sees.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from controlplane.cpctl import complete, render, when
from controlplane.cpctl.commands import cli, current_decision, emit_json, pass_settings
from controlplane.cpctl.errors import CpctlError, Refused, UsageProblem
from controlplane.cpctl.follow import follow
from controlplane.cpctl.http import Client
from controlplane.cpctl.options import Settings, command, subgroup

SERVE_WAIT_S = 30.0

# Kept here too: drill.py takes it from this module.
parse_duration = when.parse_duration

F = TypeVar("F", bound=Callable[..., Any])


def action_options(f: F) -> F:
    """--reason, --yes and --dry-run, which every action takes."""
    f = click.option("--dry-run", is_flag=True, help="Show what would change and stop; commit nothing.")(f)
    f = click.option("-y", "--yes", is_flag=True, help="Commit without asking (for scripts).")(f)
    f = click.option(
        "-r",
        "--reason",
        required=True,
        metavar="TEXT",
        help="Why: recorded with the change and shown in history.",
    )(f)
    return f


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: a DURATION option's seconds (> 0), or a usage error naming it."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than 0 s", ctx, param)
    return seconds


def _keep_for(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    seconds = duration_option(ctx, param, value)
    if seconds is not None:
        ctx.meta["for_s"] = seconds


def standing_options(f: F) -> F:
    """--for: the intent ends by itself after this long (kept for `run_action`)."""
    return click.option(
        "--for",
        "for_",
        metavar="DURATION",
        expose_value=False,
        callback=_keep_for,
        help="End by itself after this long (90s, 30m, 2h, 1d): the agents remove it then, "
        "even if this terminal is gone. Default: stands until removed.",
    )(f)


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # closed
        return False


def require_terminal_or_yes(yes: bool, dry_run: bool) -> None:
    if not (yes or dry_run or stdin_is_terminal()):
        raise UsageProblem(
            "this would ask for confirmation but stdin is not a terminal: "
            "use --yes to commit without asking, or --dry-run to see the plan only"
        )


def confirm(question: str) -> None:
    if not click.confirm(question, default=False, err=True):
        raise CpctlError("not confirmed: nothing was committed")


# Scopes in the order they allow more (as the agents rank them).
SCOPE_RANK = {"read": 0, "lb": 1, "operate": 2, "admin": 3}
ADMIN_KINDS = frozenset({"freeze", "unfreeze"})


def needed_scope(kind: str) -> str:
    return "admin" if kind in ADMIN_KINDS else "operate"


def check_may_write(client: Client, before: dict[str, Any], what: str, scope: str) -> None:
    """Refuse, in one line and before any plan is shown, a write that cannot succeed.

    The agent that served `before` has lost quorum (cpctl asks the others first, so none
    of them has it): nothing can commit. The token is unknown, or its scope too small.
    An agent without `GET /v1/whoami` (older) is not asked about the token.
    """
    if before.get("stale"):
        stale_s = before.get("stale_s")
        age = f" for {render.ago(float(stale_s))}" if isinstance(stale_s, int | float) else ""
        raise CpctlError(
            f"cannot {what}: {before.get('served_by')} has lost quorum{age} and no agent given has it, "
            "so nothing can commit; nothing was asked (see `cpctl status`)"
        )
    try:
        me = client.get("/v1/whoami").body
    except Refused as e:
        if e.status == 404:
            return
        raise CpctlError(f"cannot {what}: {e.message}") from None
    has = str(me.get("scope"))
    if SCOPE_RANK.get(has, -1) >= SCOPE_RANK[scope]:
        return
    if not client.token:
        raise CpctlError(
            f"cannot {what}: missing bearer token, and this needs scope {scope}; "
            "cpctl sent no token: set CPCTL_TOKEN or use --token-file"
        )
    raise CpctlError(f"cannot {what}: token {me.get('name')} has scope {has}; this needs {scope} or above")


def wait_served(client: Client, seq: int, revision: int | None) -> tuple[dict[str, Any], bool]:
    """The decision served once it carries intent `seq` (blocking queries, bounded).

    Returns (decision, True) when served within SERVE_WAIT_S, else the latest one and False.
    """
    deadline = time.monotonic() + SERVE_WAIT_S
    latest: dict[str, Any] = current_decision(client)

    def carries(d: dict[str, Any]) -> bool:
        return int(d.get("intent_seq", 0)) >= seq and (revision is None or int(d["revision"]) >= revision)

    if carries(latest):
        return latest, True
    for served in follow(client, wait_s=SERVE_WAIT_S, deadline=deadline):
        latest = dict(served.body)
        if carries(latest):
            return latest, True
    return latest, False


def run_action(settings: Settings, body: dict[str, Any], what: str, yes: bool, dry_run: bool) -> None:
    """Plan, show, confirm, commit, wait until served, show (see the module docstring)."""
    require_terminal_or_yes(yes, dry_run)
    for_s = click.get_current_context().meta.get("for_s")
    if for_s is not None:
        body = {**body, "for_s": for_s}
        what = f"{what} for {render.ago(for_s)}"
    client = settings.client()
    before = current_decision(client)
    if not dry_run:
        check_may_write(client, before, what, needed_scope(str(body["kind"])))
    planned = client.post("/v1/plan", {"intents": [body]}, idempotent=True).body
    out = render.make_console()
    if dry_run:
        if settings.json:
            emit_json(planned)
            return
        out.print(render.plan(before, planned, what))
        out.print(
            f"dry run: nothing committed (revision {before['revision']} is still in force)", style="dim"
        )
        return
    if not (yes and settings.json):
        # With -o json, stdout carries only the result; the plan goes to the person on stderr.
        (render.make_console(stderr=True) if settings.json else out).print(render.plan(before, planned, what))
    if not yes:
        confirm(f"Commit {what}?")
    # The id makes the write safe to resend: if an agent takes it and then does not
    # answer, the next agent gets the same id and the intent still commits once.
    accepted = client.post("/v1/intents", {**body, "id": secrets.token_hex(8)}, idempotent=True)
    answer = accepted.body
    seq = int(answer["seq"])
    served, in_force = wait_served(client, seq, answer.get("revision"))
    result = {
        "id": answer["id"],
        "seq": seq,
        "revision": answer.get("revision") if answer.get("revision") is not None else served["revision"],
        "served_revision": served["revision"],
        "served_by": served.get("served_by"),
        "in_force": in_force,
        "intent": {**body, "who": answer.get("who") or settings.who()},
        "decision": served,
    }
    if settings.json:
        emit_json(result)
    else:
        out.print(
            f"committed {what}: intent {answer['id']} (seq {seq}); "
            + (
                f"{served.get('served_by')} serves it in revision {served['revision']}"
                if in_force
                else f"{served.get('served_by')} does not serve it yet"
            ),
            style="bold" if in_force else "bold red",
        )
        changed = {
            line.split(":", 1)[0].split("/", 1)[-1] for line in render.decision_changes(before, served)
        }
        services = changed & set(served.get("services", {}))
        out.print(render.weights_table(served, before=before, services=services or None))
        for line in render.flags_lines(served):
            out.print(line)
        out.print(render.reasons_block(served))
    if not in_force:
        raise CpctlError(
            f"intent {answer['id']} is committed, but {served.get('served_by')} did not serve a "
            f"decision carrying it within {SERVE_WAIT_S:g} s (latest revision {served['revision']}): "
            "see `cpctl status`"
        )


def scope(region: str, service: str | None) -> str:
    return f"{region}/{service}" if service else f"{region} (every service)"


@command(cli, "drain", section="Act")
@click.argument("region", shell_complete=complete.regions)
@click.option(
    "-s",
    "--service",
    metavar="SERVICE",
    shell_complete=complete.services,
    help="Drain only this service. Default: every service in REGION.",
)
@standing_options
@action_options
@pass_settings
def drain(
    settings: Settings, region: str, service: str | None, reason: str, yes: bool, dry_run: bool
) -> None:
    """Take a region, or one of its services, out of traffic.

    REGION gets weight 0 and its share moves to the other regions. The agents refuse a
    drain that would leave a service with fewer than min_healthy_regions serving.

    \b
    Examples:
      cpctl drain cn-east --reason "db failover in cn-east" --dry-run
      cpctl drain cn-east --service order --reason "order pods crash-looping"
    """
    body = {"kind": "drain", "region": region, "service": service, "reason": reason}
    run_action(settings, body, f"drain {scope(region, service)}", yes, dry_run)


@command(cli, "undrain", section="Act")
@click.argument("region", shell_complete=complete.regions)
@click.option(
    "-s",
    "--service",
    metavar="SERVICE",
    shell_complete=complete.services,
    help="Undrain only this service. Default: every service in REGION.",
)
@action_options
@pass_settings
def undrain(
    settings: Settings, region: str, service: str | None, reason: str, yes: bool, dry_run: bool
) -> None:
    """Give a drained region its traffic back.

    REGION gets traffic again after the policy's recovery hold, ramping up in steps.

    \b
    Example:
      cpctl undrain cn-east --reason "db is back"
    """
    body = {"kind": "undrain", "region": region, "service": service, "reason": reason}
    run_action(settings, body, f"undrain {scope(region, service)}", yes, dry_run)


@command(cli, "failover", section="Act")
@click.option(
    "--from",
    "from_region",
    required=True,
    metavar="REGION",
    shell_complete=complete.regions,
    help="The region to move traffic off.",
)
@click.option(
    "--to",
    "to_region",
    required=True,
    metavar="REGION",
    shell_complete=complete.regions,
    help="The region that takes it.",
)
@click.option(
    "-s",
    "--service",
    metavar="SERVICE",
    shell_complete=complete.services,
    help="Fail over only this service. Default: every service.",
)
@standing_options
@action_options
@pass_settings
def failover(
    settings: Settings,
    from_region: str,
    to_region: str,
    service: str | None,
    reason: str,
    yes: bool,
    dry_run: bool,
) -> None:
    """Move a region's traffic to another region.

    For every service, or only --service. The target takes the traffic up to its
    capacity; the rest goes to the other regions. It stands until removed with
    `cpctl intent rm ID` (see `cpctl intents`).

    \b
    Example:
      cpctl failover --from cn-east --to cn-south --service order --reason "east order db slow"
    """
    body = {"kind": "failover", "from": from_region, "to": to_region, "service": service, "reason": reason}
    what = f"failover {from_region} -> {to_region} ({service or 'every service'})"
    run_action(settings, body, what, yes, dry_run)


def parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, int] | None:
    if value is None:
        return None
    out: dict[str, int] = {}
    for pair in value.split(","):
        region, sep, weight = pair.strip().partition("=")
        if not sep or not region.strip() or not weight.strip().isdigit():
            raise click.BadParameter(
                f"expected REGION=WEIGHT[,REGION=WEIGHT...] (got {pair.strip()!r})", ctx, param
            )
        if region.strip() in out:
            raise click.BadParameter(f"{region.strip()} is given twice", ctx, param)
        out[region.strip()] = int(weight)
    return out


@command(cli, "override", section="Act")
@click.option(
    "-s",
    "--service",
    required=True,
    metavar="SERVICE",
    shell_complete=complete.services,
    help="The service whose weights to set.",
)
@click.option(
    "-w",
    "--weights",
    required=True,
    metavar="REGION=N,...",
    callback=parse_weights,
    help="The weights, summing to 100; a region left out gets 0.",
)
@standing_options
@action_options
@pass_settings
def override(
    settings: Settings, service: str, weights: dict[str, int], reason: str, yes: bool, dry_run: bool
) -> None:
    """Set a service's weights by hand.

    They win over what automation decides. It stands until removed with
    `cpctl intent rm ID` (see `cpctl intents`).

    \b
    Example:
      cpctl override --service order --weights cn-east=70,cn-south=30 --reason "load test"
    """
    body = {"kind": "override", "service": service, "weights": weights, "reason": reason}
    pairs = ", ".join(f"{r}={w}" for r, w in weights.items())
    run_action(settings, body, f"override {service} weights {pairs}", yes, dry_run)


feature = subgroup(cli, "feature", "Act", "Switch a feature off or on for every application.")


@command(feature, "disable", section="Act")
@click.argument("name", shell_complete=complete.features)
@standing_options
@action_options
@pass_settings
def feature_disable(settings: Settings, name: str, reason: str, yes: bool, dry_run: bool) -> None:
    """Switch feature NAME off, whatever the degradation policy says.

    It stands until removed with `cpctl intent rm ID` (see `cpctl intents`).

    \b
    Example:
      cpctl feature disable comments --reason "comments db overloaded"
    """
    body = {"kind": "feature", "name": name, "enabled": False, "reason": reason}
    run_action(settings, body, f"feature {name} off", yes, dry_run)


@command(feature, "enable", section="Act")
@click.argument("name", shell_complete=complete.features)
@standing_options
@action_options
@pass_settings
def feature_enable(settings: Settings, name: str, reason: str, yes: bool, dry_run: bool) -> None:
    """Switch feature NAME on, whatever the degradation policy says.

    This forces it on even when capacity is short. To hand the feature back to the
    degradation policy instead, remove the standing feature intent with `cpctl intent rm`.
    """
    body = {"kind": "feature", "name": name, "enabled": True, "reason": reason}
    run_action(settings, body, f"feature {name} on", yes, dry_run)


@command(cli, "freeze", section="Act")
@standing_options
@action_options
@pass_settings
def freeze(settings: Settings, reason: str, yes: bool, dry_run: bool) -> None:
    """Stop automation from changing traffic.

    Until `cpctl unfreeze`, weights change only by operator intents.
    """
    run_action(settings, {"kind": "freeze", "reason": reason}, "freeze automation", yes, dry_run)


@command(cli, "unfreeze", section="Act")
@action_options
@pass_settings
def unfreeze(settings: Settings, reason: str, yes: bool, dry_run: bool) -> None:
    """Hand control back to automation."""
    run_action(settings, {"kind": "unfreeze", "reason": reason}, "unfreeze automation", yes, dry_run)


intent = subgroup(cli, "intent", "Act", "Remove a standing intent (see `cpctl intents`).")


@command(intent, "rm", section="Act")
@click.argument("intent_id", metavar="ID")
@action_options
@pass_settings
def intent_rm(settings: Settings, intent_id: str, reason: str, yes: bool, dry_run: bool) -> None:
    """Remove standing intent ID; automation decides again.

    IDs are listed by `cpctl intents`. The intent and the plan without it (what would
    change) are shown before asking.

    \b
    Example:
      cpctl intent rm 1dae716243ae4b74 --reason "incident 4711 over"
    """
    require_terminal_or_yes(yes, dry_run)
    client = settings.client()
    before = current_decision(client)
    standing = client.get("/v1/intents").body
    found = next((i for i in standing.get("intents", []) if i.get("id") == intent_id), None)
    what = f"remove intent {intent_id}"
    if found is not None:
        what += f" ({found.get('kind')} {render.intent_target(found)})"
        if not dry_run:
            check_may_write(client, before, what, needed_scope(str(found.get("kind"))))
    planned = removal_plan(client, intent_id) if found is not None else None
    out = render.make_console(stderr=settings.json)
    if found is not None and not (yes and settings.json):
        out.print(
            f"Remove intent {intent_id}: {found.get('kind')} {render.intent_target(found)} "
            f"by {found.get('who')} ({found.get('reason')})"
        )
        if planned is not None:
            out.print(render.plan(before, planned, what))
    if dry_run:
        if found is None:
            raise CpctlError(f"no standing intent {intent_id}: see `cpctl intents`")
        if settings.json:
            emit_json({"would_remove": found, "committed": False, "plan": planned})
        else:
            out.print("dry run: nothing removed", style="dim")
        return
    if not yes:
        confirm(f"Remove intent {intent_id}?")
    removed = client.delete(f"/v1/intents/{intent_id}", {"reason": reason}).body
    # DELETE answers with the removed intent only; the removal took the next intent seq,
    # which the agent that answered reports once it has applied it.
    seq = int(client.get("/v1/intents").body.get("intent_seq", 0))
    served, in_force = wait_served(client, seq, None)
    if settings.json:
        emit_json(
            {
                **removed,
                "revision": served["revision"],
                "served_by": served.get("served_by"),
                "in_force": in_force,
            }
        )
    else:
        render.make_console().print(
            f"removed intent {intent_id}; {served.get('served_by')} serves revision {served['revision']}",
            style="bold",
        )
        render.make_console().print(render.weights_table(served, before=before))
    if not in_force:
        raise CpctlError(f"intent {intent_id} is removed, but the decision without it is not served yet")


def removal_plan(client: Client, intent_id: str) -> dict[str, Any] | None:
    """The plan without standing intent `intent_id`; None from an agent that cannot plan a removal."""
    try:
        planned: dict[str, Any] = client.post("/v1/plan", {"remove": [intent_id]}, idempotent=True).body
    except Refused as e:
        if e.status == 400 and "remove" in e.detail:  # an older agent: no `remove` in its PlanBody
            return None
        raise
    return planned


@command(cli, "plan")
@click.option(
    "-f",
    "--fail",
    "fail",
    multiple=True,
    required=True,
    metavar="REGION",
    shell_complete=complete.regions,
    help="A region to suppose down (repeat for several).",
)
@pass_settings
def plan(settings: Settings, fail: tuple[str, ...]) -> None:
    """What would happen if regions went down.

    The weights, features and shedding that would follow if every --fail REGION went
    down.
    Computed by the agent from the current observations and intents; commits nothing.

    \b
    Example:
      cpctl plan --fail cn-east --fail cn-south
    """
    client = settings.client()
    before = current_decision(client)
    planned = client.post("/v1/plan", {"fail": list(fail)}, idempotent=True).body
    if settings.json:
        emit_json(planned)
        return
    out = render.make_console()
    out.print(render.plan(before, planned, f"if {', '.join(fail)} went down"))
    out.print(f"nothing committed (revision {before['revision']} is in force)", style="dim")
