"""`cpctl drill`: take a region out on purpose and prove the recovery time, end to end.

    cpctl drill REGION [--service S] --duration 5m --objective 90s --reason TEXT
    cpctl drill stop --reason TEXT
    cpctl drill history

A drill is an intent (`kind: drill`) with an end: the agents judge the region down
exactly as a failure would (same weights, degradation and reasons, marked DRILL) until
the intent expires, so the region comes back by itself even if this terminal, cpctl or
the agent it talked to dies. cpctl shows the plan and asks (like every action), commits
the intent, then measures with a live progress display (`drill_measure`): decision
committed, served by every agent, applied by every reporting load balancer (the RTO,
against the objective), and the way back after the end (hold and ramp included).
Ctrl-C or `cpctl drill stop` ends a drill early. The result is printed (a table, or
JSON with `-o json`), written as a Markdown report with an SVG timeline when asked
(`--report FILE.md`), and recorded in the cluster (`POST /v1/drills`) for `cpctl drill
history`, the last-drill metrics and the alert when no drill passed in 30 days.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import click

from controlplane.cpctl import complete, render
from controlplane.cpctl.actions import (
    SERVE_WAIT_S,
    check_may_write,
    confirm,
    duration_option,
    needed_scope,
    require_terminal_or_yes,
)
from controlplane.cpctl.commands import cli, current_decision, emit_json, pass_settings
from controlplane.cpctl.drill_measure import Recorder, Timeline, stages, weight_timeline
from controlplane.cpctl.drill_report import STAGE_WORDS, markdown, svg, verdict_line
from controlplane.cpctl.errors import CpctlError, Refused
from controlplane.cpctl.http import Client
from controlplane.cpctl.options import CpctlGroup, Settings, command, global_options

PROGRESS_POLL_S = 0.1
# Past the recovery hold and ramp, the way back is given up on after this long.
BACK_TIMEOUT_S = 600.0


class DrillGroup(CpctlGroup):
    """`cpctl drill REGION ...` starts one; `stop` and `history` are subcommands."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().resolve_command(ctx, args)


drill = DrillGroup(
    "drill",
    params=global_options(),
    help="Take a region out on purpose and measure the recovery time.\n\n"
    "`cpctl drill REGION [OPTIONS]` is short for `cpctl drill start REGION [OPTIONS]` "
    "(see `cpctl drill start --help`).",
)
drill.section = "Act"
cli.add_command(drill)


@command(drill, "start", section="Act")
@click.argument("region", shell_complete=complete.regions)
@click.option(
    "-s",
    "--service",
    metavar="SERVICE",
    shell_complete=complete.services,
    help="Drill only this service. Default: every service.",
)
@click.option(
    "--duration", default="5m", show_default=True, callback=duration_option, metavar="DURATION",
    help="How long the region stays out; it comes back by itself then, whatever happens to cpctl.",
)  # fmt: skip
@click.option(
    "--objective", default="90s", show_default=True, callback=duration_option, metavar="DURATION",
    help="The recovery time objective the RTO is judged against.",
)  # fmt: skip
@click.option(
    "--prometheus", metavar="URL", default=lambda: os.environ.get("CPCTL_DRILL_PROMETHEUS"),
    help="Prometheus to measure traffic from during the drill [env CPCTL_DRILL_PROMETHEUS].",
)  # fmt: skip
@click.option(
    "--traffic-query", metavar="PROMQL", default=lambda: os.environ.get("CPCTL_DRILL_TRAFFIC_QUERY"),
    help="Traffic left on the region; `$region` is replaced [env CPCTL_DRILL_TRAFFIC_QUERY].",
)  # fmt: skip
@click.option(
    "--error-query", metavar="PROMQL", default=lambda: os.environ.get("CPCTL_DRILL_ERROR_QUERY"),
    help="Error rate during the drill; `$region` is replaced [env CPCTL_DRILL_ERROR_QUERY].",
)  # fmt: skip
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.md",
    help="Write the Markdown report here, and its SVG timeline next to it (FILE.svg).",
)  # fmt: skip
@click.option("-r", "--reason", required=True, metavar="TEXT", help="Why: recorded with the drill.")
@click.option("-y", "--yes", is_flag=True, help="Start without asking (for scripts).")
@click.option("--dry-run", is_flag=True, help="Show the plan and the refusals; start nothing.")
@pass_settings
def drill_start(
    settings: Settings,
    region: str,
    service: str | None,
    duration: float,
    objective: float,
    prometheus: str | None,
    traffic_query: str | None,
    error_query: str | None,
    report_path: Path | None,
    reason: str,
    yes: bool,
    dry_run: bool,
) -> None:
    """Take REGION out as a failure would, for --duration, and measure the recovery time.

    \b
    Examples:
      cpctl drill cn-east --duration 5m --objective 90s --reason "quarterly game day" --report east.md
      cpctl drill cn-east --service order --duration 2m --reason "order only" --dry-run
    """
    require_terminal_or_yes(yes, dry_run)
    client = settings.client()
    body: dict[str, Any] = {
        "kind": "drill",
        "region": region,
        "service": service,
        "reason": reason,
        "for_s": duration,
    }
    queries = {
        name: q.replace("$region", region)
        for name, q in (("traffic", traffic_query), ("errors", error_query))
        if q
    }
    err = render.make_console(stderr=True)
    out = err if settings.json else render.make_console()
    before = current_decision(client)
    what = f"drill of {region}{f'/{service}' if service else ''} for {render.ago(duration)}"
    if not dry_run:  # a plan nobody may act on is not shown (as for every action)
        check_may_write(client, before, f"start a {what}", needed_scope("drill"))
    planned = client.post("/v1/plan", {"intents": [body]}, idempotent=True).body
    lbs_at_start = _lbs(client)
    out.print(render.plan(before, planned, what))
    out.print(
        f"objective {render.ago(objective)}; "
        + (
            f"{len(lbs_at_start)} load balancer(s) report: {', '.join(lb['name'] for lb in lbs_at_start)}"
            if lbs_at_start
            else "no load balancer reports to the agents: the RTO will be measured to the agents"
        )
    )
    if planned.get("refusals"):
        raise CpctlError(f"refused: {planned['refusals'][0]}")
    if dry_run:
        out.print("dry run: no drill started", style="dim")
        return
    if not yes:
        confirm(f"Start the {what}?")
    agents = _agents(client)
    recorder = Recorder(client, agents, prometheus=prometheus, queries=queries)
    recorder.start(int(before["revision"]))
    started_at = time.time()
    try:
        accepted = client.post("/v1/intents", {**body, "id": secrets.token_hex(8)}, idempotent=True).body
    except BaseException:
        recorder.stop()
        raise
    answered_at = time.time()
    intent_id, seq = str(accepted["id"]), int(accepted["seq"])
    # Cluster time (commits, the drill's end) minus this machine's clock: the agent
    # stamped the intent between sending and answering; the error is half the round trip.
    created = accepted.get("created_at")
    offset = float(created) - (started_at + answered_at) / 2 if isinstance(created, int | float) else 0.0
    timeline = Timeline(
        started_at=started_at,
        ended_at=None,
        cluster_offset=offset,
        drill_seq=seq,
        base_revision=int(before["revision"]),
        drilled=tuple(
            (s, region)
            for s in before.get("services", {})
            if service in (None, s) and region in before["services"][s]
        ),
        base_weights={
            s: {r: int(p["weight"]) for r, p in ps.items()} for s, ps in before.get("services", {}).items()
        },
        agents=tuple(agents),
        lb_names=tuple(lb["name"] for lb in lbs_at_start),
    )
    err.print(
        f"drill started: intent {intent_id}; it ends by itself in {render.ago(duration)} (Ctrl-C ends it now)"
    )
    ended_by = "expiry"
    try:
        _progress(err, recorder, timeline, out_phase=True, deadline=started_at + duration)
        ended_by = _hold(client, intent_id, started_at + duration, err)
    except KeyboardInterrupt:
        ended_by = _stop_early(client, intent_id, settings.who(), err)
    ended = _ended_at(client, intent_id)
    ended_at = ended - offset if ended is not None else time.time()
    timeline = Timeline(**{**_fields(timeline), "ended_at": ended_at})
    try:
        _progress(err, recorder, timeline, out_phase=False, deadline=time.time() + BACK_TIMEOUT_S)
    except KeyboardInterrupt:
        err.print("not waiting for the way back any longer", style="yellow")
    finally:
        recorder.stop()
    result = _result(
        settings, body, intent_id, objective, timeline, recorder, lbs_at_start, ended_by, prometheus, queries
    )
    _record(client, result, err)
    if report_path is not None:
        chart = report_path.with_suffix(".svg")
        chart.write_text(svg(result), encoding="utf-8")
        report_path.write_text(markdown(result, chart.name), encoding="utf-8")
        err.print(f"report written to {report_path} (timeline {chart})")
    if settings.json:
        emit_json(result)
    else:
        _print_result(out, result)
    if not result["passed"]:
        raise CpctlError(verdict_line(result))


def _fields(t: Timeline) -> dict[str, Any]:
    return {name: getattr(t, name) for name in t.__slots__}


def _lbs(client: Client) -> list[dict[str, Any]]:
    """The load balancers reporting now (none when the agents have no such route)."""
    try:
        body = client.get("/v1/lbs").body
    except Refused as e:
        if e.status == 404:
            return []
        raise
    return [lb for lb in body.get("lbs", []) if lb.get("state") != "silent"]


def _agents(client: Client) -> dict[str, str]:
    cluster = client.get("/v1/cluster").body
    scheme = client.endpoint.split("://", 1)[0]
    found = {str(m["id"]): f"{scheme}://{m['http']}" for m in cluster.get("members", []) if m.get("http")}
    me = cluster.get("agent") or cluster.get("id")
    if me and me not in found:
        found[str(me)] = client.endpoint
    return found


def _progress(err: Any, recorder: Recorder, timeline: Timeline, *, out_phase: bool, deadline: float) -> None:
    """Print each stage as it is reached; return when the phase is done (or at `deadline`)."""
    keys = ["committed", "served_all"] + (["applied_all"] if timeline.lb_names else [])
    if not out_phase:
        keys = ["back_committed", "back_weight_all"]
        keys += ["back_applied_all"] if timeline.lb_names else []
        keys += ["back_full_all"]
    shown: set[str] = set()
    while time.time() < deadline:
        now = stages(timeline, list(recorder.served), list(recorder.lbs))
        for key in keys:
            if key not in shown and now.get(key) is not None:
                shown.add(key)
                err.print(f"  {now[key]:7.2f} s  {STAGE_WORDS[key]}")
        if len(shown) == len(keys):
            return
        time.sleep(PROGRESS_POLL_S)


def _hold(client: Client, intent_id: str, until: float, err: Any) -> str:
    """Until the drill's intent is gone: 'expiry', or who removed it ('cpctl drill stop')."""
    err.print(f"holding until {render.utc(until)} (Ctrl-C or `cpctl drill stop` ends the drill early)")
    while True:
        standing = client.get("/v1/intents").body.get("intents", [])
        if not any(i.get("id") == intent_id for i in standing):
            return _removed_by(client, intent_id) or "removed"
        time.sleep(min(1.0, max(0.1, until - time.time())))


def _stop_early(client: Client, intent_id: str, who: str, err: Any) -> str:
    err.print("ending the drill now (Ctrl-C)", style="yellow")
    try:
        client.delete(f"/v1/intents/{intent_id}", {"reason": f"drill ended early by {who} (Ctrl-C)"})
    except Refused as e:
        if e.status != 404:  # 404: it had just expired
            raise
    return f"stopped early by {who}"


def _history_entry(client: Client, intent_id: str) -> dict[str, Any] | None:
    entries = client.get("/v1/history", {"limit": "200"}).body.get("entries", [])
    found = [e for e in entries if e.get("intent_id") == intent_id and e.get("kind") == "intent-removed"]
    return found[0] if found else None


def _removed_by(client: Client, intent_id: str) -> str | None:
    entry = _history_entry(client, intent_id)
    return (
        None
        if entry is None
        else ("expiry" if entry.get("who") == "expiry" else f"stopped by {entry.get('who')}")
    )


def _ended_at(client: Client, intent_id: str) -> float | None:
    deadline = time.time() + SERVE_WAIT_S
    while time.time() < deadline:
        entry = _history_entry(client, intent_id)
        if entry is not None:
            return float(entry["at"])
        time.sleep(0.2)
    return None


def _result(
    settings: Settings,
    body: dict[str, Any],
    intent_id: str,
    objective: float,
    timeline: Timeline,
    recorder: Recorder,
    lbs_at_start: list[dict[str, Any]],
    ended_by: str,
    prometheus: str | None,
    queries: dict[str, str],
) -> dict[str, Any]:
    measured = stages(timeline, list(recorder.served), list(recorder.lbs))
    rto = measured.get("applied_all") if timeline.lb_names else measured.get("served_all")
    traffic: dict[str, Any] = {}
    if not prometheus or not queries:
        traffic["missing"] = "no Prometheus query given (--prometheus and --traffic-query or --error-query)"
    else:
        series = {
            name: [
                (round(s.at - timeline.started_at, 3), s.value) for s in recorder.samples if s.name == name
            ]
            for name in queries
        }
        broken = {k: v for k, v in recorder.problems.items() if k.startswith("prometheus")}
        if broken and not any(v is not None for points in series.values() for _, v in points):
            traffic["missing"] = "Prometheus could not be read: " + "; ".join(broken.values())
        traffic["series"] = series
        traffic["queries"] = queries
    first_agent = next(iter(timeline.agents), "")
    return {
        "kind": "drill",
        "intent_id": intent_id,
        "region": body["region"],
        "service": body.get("service"),
        "reason": body["reason"],
        "who": settings.who(),
        "duration_s": body["for_s"],
        "objective_s": objective,
        "started_at": timeline.started_at,
        "ended_at": timeline.ended_at,
        "ended_after_s": None
        if timeline.ended_at is None
        else round(timeline.ended_at - timeline.started_at, 3),
        "ended_by": ended_by,
        "rto_s": rto,
        "rto_measured_to": "every reporting load balancer"
        if timeline.lb_names
        else "every agent (no LB reports)",
        "passed": rto is not None and rto <= objective and not measured.get("late_lbs"),
        "stages": measured,
        "lbs": [
            {"name": lb["name"], "adapter": lb.get("adapter"), "state": lb.get("state")}
            for lb in lbs_at_start
        ],
        "agents": list(timeline.agents),
        "timeline": weight_timeline(list(recorder.served), first_agent, timeline.started_at),
        "traffic": traffic,
        "problems": dict(recorder.problems),
    }


def _record(client: Client, result: dict[str, Any], err: Any) -> None:
    """Record the result in the cluster (history, metrics); say so when it cannot be."""
    stage_times = {k: v for k, v in result["stages"].items() if k in STAGE_WORDS}
    record = {
        "id": result["intent_id"],
        "region": result["region"],
        "service": result["service"],
        "started_at": result["started_at"],
        "ended_at": result["ended_at"] or time.time(),
        "objective_s": result["objective_s"],
        "rto_s": result["rto_s"],
        "passed": result["passed"],
        "stages": stage_times,
        "late_lbs": result["stages"].get("late_lbs", [])[:64],
        "summary": verdict_line(result)[:500],
    }
    try:
        client.post("/v1/drills", record, idempotent=True)
    except Refused as e:
        err.print(f"the result could not be recorded in the cluster: {e.message}", style="yellow")
        result["recorded"] = False
        return
    result["recorded"] = True


def _print_result(out: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=verdict_line(result), title_justify="left", header_style="bold")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for key, words in STAGE_WORDS.items():
        if key in result["stages"]:
            value = result["stages"][key]
            table.add_row(words, "not reached" if value is None else f"{value:.2f}")
    out.print(table)
    late = result["stages"].get("late_lbs", []) + result["stages"].get("back_late_lbs", [])
    if late:
        out.print(f"late or failed load balancers: {', '.join(sorted(set(late)))}", style="bold red")
    if result["traffic"].get("missing"):
        out.print(f"traffic: not measured: {result['traffic']['missing']}", style="yellow")


@command(drill, "stop", section="Act")
@click.option("-r", "--reason", default="ended early", show_default=True, metavar="TEXT", help="Why.")
@pass_settings
def drill_stop(settings: Settings, reason: str) -> None:
    """End the running drill now; the region comes back through the recovery hold and ramp."""
    client = settings.client()
    running = [i for i in client.get("/v1/intents").body.get("intents", []) if i.get("kind") == "drill"]
    if not running:
        raise CpctlError("no drill is running")
    for intent in running:
        client.delete(f"/v1/intents/{intent['id']}", {"reason": reason})
        render.make_console().print(f"drill of {intent.get('region')} ({intent['id']}) ended: {reason}")


@command(drill, "history")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 100), help="How many.")
@pass_settings
def drill_history(settings: Settings, limit: int) -> None:
    """Past drills, newest first: when, what, who, the RTO against the objective."""
    client = settings.client()
    drills = client.get("/v1/drills", {"limit": str(limit)}).body
    if settings.json:
        emit_json(drills)
        return
    from rich.table import Table

    table = Table(header_style="bold")
    for column in ("ended", "drill", "who", "RTO", "objective", "result"):
        table.add_column(column)
    for d in drills.get("drills", []):
        scope = f"{d['region']}/{d['service']}" if d.get("service") else d["region"]
        rto = "-" if d.get("rto_s") is None else f"{d['rto_s']:.1f} s"
        table.add_row(
            render.utc(d.get("ended_at")),
            scope,
            str(d.get("who", "?")),
            rto,
            f"{d['objective_s']:g} s",
            "passed" if d.get("passed") else "FAILED",
        )
    render.make_console().print(table if drills.get("drills") else "no drill recorded yet")
