"""Tables and lines for people, drawn with rich from the API's JSON answers.

Everything here is a pure function of those answers (and `now`, for ages), so what
cpctl shows is what the agent said. Colour follows the state: healthy green, degraded
yellow, down red, drained blue; rich drops colour when stdout is not a terminal or
NO_COLOR is set.

Server text is data: an operator's reason may be `[/]` or carry terminal escapes (from
an older agent, or something posing as one). The console never reads markup or emoji
codes in strings, and every character of text it writes passes `printable`, which
drops control characters (C0 but newline and tab, DEL, C1, bidirectional overrides);
rich's own styling is added after that, so colours still work.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from controlplane.cpctl.errors import OutputClosed

Json = Mapping[str, Any]

# A clock this far off the leader's is shown in yellow (the alert rule fires past it too).
SKEW_WARN_S = 5.0

STATE_STYLES = {"healthy": "green", "degraded": "yellow", "down": "bold red", "drained": "blue"}


def utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(seconds: float) -> str:
    """`4.2 s`, `3 min 4 s`, `2 h 5 min`: an age at a glance."""
    if seconds < 0:
        return "just now"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def regions_of(decision: Json) -> list[str]:
    """Every region the decision places, in the order the agents list them."""
    out: list[str] = []
    for placements in decision.get("services", {}).values():
        for region in placements:
            if region not in out:
                out.append(region)
    return out


def placement_text(placement: Json | None, before: Json | None = None) -> Text:
    if placement is None:
        return Text("-", style="dim")
    state = str(placement.get("state", "?"))
    weight = placement.get("weight")
    text = Text()
    if before is not None and (before.get("weight") != weight or before.get("state") != state):
        text.append(f"{before.get('weight')} {before.get('state')} -> ", style="dim")
    text.append(f"{weight:>3} ", style="bold")
    text.append(state, style=STATE_STYLES.get(state, ""))
    ramp = placement.get("ramp")
    if state == "healthy" and isinstance(ramp, int | float) and 0 < ramp < 1:
        text.append(f" (ramp {ramp:.0%})", style="yellow")
    return text


def weights_table(
    decision: Json,
    before: Json | None = None,
    services: Iterable[str] | None = None,
    title: str | None = None,
) -> Table:
    """One row per service, one column per region: weight and state (old -> new when `before`)."""
    regions = regions_of(decision)
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("service")
    for region in regions:
        table.add_column(region)
    wanted = set(services) if services is not None else None
    old_services = before.get("services", {}) if before else {}
    for service, placements in decision.get("services", {}).items():
        if wanted is not None and service not in wanted:
            continue
        old = old_services.get(service, {}) if before else None
        cells = [
            placement_text(placements.get(region), old.get(region) if old is not None else None)
            for region in regions
        ]
        table.add_row(service, *cells)
    return table


def flags_lines(decision: Json) -> list[Text]:
    """Features off, shedding, panic, frozen and stale: what is not normal, in words."""
    lines: list[Text] = []
    off = sorted(name for name, on in decision.get("features", {}).items() if not on)
    lines.append(
        Text.assemble(("features off: ", "bold"), (", ".join(off), "yellow"))
        if off
        else Text.assemble(("features off: ", "bold"), ("none", "dim"))
    )
    shed = float(decision.get("shed_fraction") or 0.0)
    lines.append(
        Text.assemble(
            ("shedding: ", "bold"), (f"{shed:.0%} of low-priority requests", "yellow" if shed else "dim")
        )
    )
    if decision.get("panic"):
        lines.append(
            Text(
                "PANIC: the verdicts would take every region out; the last decision is kept", style="bold red"
            )
        )
    if decision.get("frozen"):
        lines.append(
            Text("FROZEN: automation is frozen; only operator intents change traffic", style="bold yellow")
        )
    if decision.get("stale"):
        stale_s = decision.get("stale_s")
        age = f" {ago(float(stale_s))} ago" if isinstance(stale_s, int | float) else ""
        lines.append(
            Text(
                f"STALE: {decision.get('served_by', 'this agent')} lost quorum{age}; "
                "it serves the last committed decision",
                style="bold red",
            )
        )
    return lines


def reasons_block(decision: Json, skip: Iterable[str] = ()) -> RenderableType:
    """The decision's reasons, one a line (but those in `skip`, shown elsewhere)."""
    left_out = set(skip)
    reasons = [str(r) for r in decision.get("reasons") or [] if str(r) not in left_out]
    if not reasons:
        return Text("reasons: none given", style="dim")
    text = Text("reasons:\n", style="bold")
    for reason in reasons:
        text.append(f"  - {reason}\n", style="")
    text.rstrip()
    return text


def members_table(cluster: Json, views: Mapping[str, Json | str] | None = None) -> Table:
    """The members; with `views` (member id -> its own /v1/cluster, or why it gave none), what
    each says of itself: the revision it serves, whether it is stale and why, its clock skew."""
    table = Table(header_style="bold", title_justify="left")
    columns = ["member", "http", "connected", "role"]
    if views is not None:
        columns += ["revision", "fresh", "clock skew", "config"]
    for column in columns:
        table.add_column(column)
    for m in cluster.get("members", []):
        connected = m.get("connected")
        you = m.get("id") == cluster.get("agent")
        row: list[RenderableType] = [
            str(m.get("id")) + (" (asked)" if you else ""),
            str(m.get("http") or "-"),
            Text("yes", style="green") if connected else Text("NO", style="bold red"),
            Text("leader", style="bold") if m.get("leader") else Text("follower", style="dim"),
        ]
        if views is not None:
            row += self_view(views.get(str(m.get("id")), "not asked"), config_hashes(views))
        table.add_row(*row)
    return table


def config_hashes(views: Mapping[str, Json | str]) -> set[str]:
    """The configuration hashes the agents that answered report (one, unless a rollout is half done)."""
    return {str(v["config_hash"]) for v in views.values() if not isinstance(v, str) and v.get("config_hash")}


def self_view(view: Json | str, hashes: set[str] | None = None) -> list[RenderableType]:
    """An agent's own account: revision, fresh or stale (with why), clock skew against the
    leader, and its configuration's hash (marked when the agents do not all agree)."""
    if isinstance(view, str):
        return [
            Text("?", style="dim"),
            Text(view, style="bold red"),
            Text("-", style="dim"),
            Text("-", style="dim"),
        ]
    config = str(view.get("config_hash") or "-")
    differs = hashes is not None and len(hashes) > 1
    config_text = Text(config + (" (differs)" if differs else ""), style="bold yellow" if differs else "dim")
    fresh = view.get("has_quorum")
    why = "; ".join(str(p) for p in view.get("problems") or []) or "stale"
    skew = view.get("clock_skew_s")
    skew_text = Text("-", style="dim")
    if isinstance(skew, int | float):
        skew_text = Text(f"{skew:+.2f} s", style="bold yellow" if abs(skew) > SKEW_WARN_S else "")
    return [
        str(view.get("revision")),
        Text("yes", style="green") if fresh else Text(f"NO: {why}", style="bold red"),
        skew_text,
        config_text,
    ]


LB_STATE_STYLES = {
    "in-sync": "green",
    "applying": "yellow",
    "lagging": "bold yellow",
    "failing": "bold red",
    "silent": "bold red",
}


def lbs_table(body: Json | None) -> Table | None:
    """The load balancers that report to the agent, by name; None when none does."""
    rows = (body or {}).get("lbs") or []
    if not rows:
        return None
    table = Table(
        title=f"load balancers ({len(rows)}), against revision {(body or {}).get('revision')}",
        title_justify="left",
        header_style="bold",
    )
    for column in ("load balancer", "adapter", "applied", "lag", "age", "state", "error"):
        table.add_column(column, justify="right" if column in ("applied", "lag") else "left")
    for lb in rows:
        state = str(lb.get("state"))
        applied = lb.get("applied_revision")
        lag = lb.get("lag_revisions")
        age = lb.get("age_s")
        table.add_row(
            str(lb.get("name")),
            str(lb.get("adapter")),
            "-" if applied is None else str(applied),
            Text("-" if lag is None else str(lag), style="yellow" if lag else ""),
            ago(float(age)) if isinstance(age, int | float) else "-",
            Text(state, style=LB_STATE_STYLES.get(state, "")),
            str(lb.get("error") or ""),
        )
    return table


def status(
    cluster: Json,
    decision: Json,
    now: float,
    views: Mapping[str, Json | str] | None = None,
    lbs: Json | None = None,
) -> RenderableType:
    quorum = cluster.get("has_quorum")
    head = Text()
    head.append(f"cluster {cluster.get('cluster')}", style="bold")
    head.append(f" ({cluster.get('backend')})  leader ")
    head.append(str(cluster.get("leader") or "NONE"), style="bold" if cluster.get("leader") else "bold red")
    head.append(f"  term {cluster.get('term')}  commit index {cluster.get('commit_index')}  quorum ")
    head.append("yes" if quorum else "NO", style="green" if quorum else "bold red")
    committed = decision.get("committed_at_unix")
    age = f" ({ago(now - float(committed))} ago)" if isinstance(committed, int | float) else ""
    rev = Text()
    rev.append(f"decision revision {decision.get('revision')}", style="bold")
    rev.append(f"  committed {decision.get('committed_at')}{age} by {decision.get('leader')}")
    rev.append(f"  served by {decision.get('served_by')}")
    parts: list[RenderableType] = [head, members_table(cluster, views), Text(""), rev, *flags_lines(decision)]
    parts += [weights_table(decision), reasons_block(decision)]
    table = lbs_table(lbs)
    if table is not None:
        parts += [Text(""), table]
    return Group(*parts)


def weights_view(body: Json, service: str | None = None) -> RenderableType:
    """`cpctl weights`: the all-services table, or one service's regions as rows."""
    if service is None:
        title = f"revision {body.get('revision')}" + (" (STALE)" if body.get("stale") else "")
        decision = {
            "services": {
                name: {r: {"weight": w, "state": one["states"].get(r)} for r, w in one["weights"].items()}
                for name, one in body.get("services", {}).items()
            }
        }
        return weights_table(decision, title=title)
    table = Table(
        title=f"{service} at revision {body.get('revision')}" + (" (STALE)" if body.get("stale") else ""),
        title_justify="left",
        header_style="bold",
    )
    table.add_column("region")
    table.add_column("weight", justify="right")
    table.add_column("state")
    for region, weight in body.get("weights", {}).items():
        state = str(body.get("states", {}).get(region, "?"))
        table.add_row(region, str(weight), Text(state, style=STATE_STYLES.get(state, "")))
    return table


def regions(body: Json) -> Table:
    table = Table(header_style="bold")
    for column in ("region", "agents", "service", "capacity rps", "weight", "state", "verdict", "address"):
        table.add_column(column, justify="right" if column in ("capacity rps", "weight") else "left")
    for region in body.get("regions", []):
        first = True
        for service, s in region.get("services", {}).items():
            state = str(s.get("state") or "-")
            verdict = str(s.get("verdict") or "-")
            table.add_row(
                region.get("name") if first else "",
                ", ".join(region.get("agents", [])) if first else "",
                service,
                f"{s.get('capacity_rps', 0):g}",
                "-" if s.get("weight") is None else str(s.get("weight")),
                Text(state, style=STATE_STYLES.get(state, "")),
                Text(
                    verdict, style="bold red" if verdict == "down" else "yellow" if verdict == "slow" else ""
                ),
                str(s.get("address") or "-"),
                end_section=False,
            )
            first = False
        table.add_section()
    return table


def intent_target(intent: Json) -> str:
    kind = intent.get("kind")
    service = intent.get("service")
    if kind in ("drain", "undrain"):
        return f"{intent.get('region')}/{service}" if service else f"{intent.get('region')} (every service)"
    if kind == "failover":
        return f"{intent.get('from')} -> {intent.get('to')} ({service or 'every service'})"
    if kind == "override":
        pairs = ", ".join(f"{r}={w}" for r, w in (intent.get("weights") or {}).items())
        return f"{service}: {pairs}"
    if kind == "feature":
        return f"{intent.get('feature')} {'on' if intent.get('enabled') else 'off'}"
    if kind == "freeze":
        return "automation"
    return "-"


def intents(body: Json, now: float) -> RenderableType:
    standing = body.get("intents", [])
    if not standing:
        return Text("no standing intents: automation decides everything", style="dim")
    table = Table(header_style="bold", title=f"{len(standing)} standing intent(s)", title_justify="left")
    for column in ("id", "kind", "target", "who", "age", "ends", "reason"):
        table.add_column(column, no_wrap=column == "id")
    for i in standing:
        created = i.get("created_at")
        expires = i.get("expires_at")
        table.add_row(
            str(i.get("id")),
            str(i.get("kind")),
            intent_target(i),
            str(i.get("who")),
            ago(now - float(created)) if isinstance(created, int | float) else "-",
            f"in {ago(float(expires) - now)}" if isinstance(expires, int | float) else "when removed",
            str(i.get("reason")),
        )
    return table


def history(body: Json) -> RenderableType:
    entries = body.get("entries", [])
    if not entries:
        return Text("no history yet", style="dim")
    shown = f"{len(entries)} of {body.get('total')} entries, newest first"
    table = Table(header_style="bold", title=shown, title_justify="left")
    for column in ("at (UTC)", "rev", "kind", "who", "what"):
        table.add_column(
            column, no_wrap=column in ("at (UTC)", "rev"), justify="right" if column == "rev" else "left"
        )
    for e in entries:
        kind = str(e.get("kind"))
        table.add_row(
            utc(e.get("at")),
            str(e.get("revision")),
            Text(kind, style="bold" if kind != "decision" else ""),
            str(e.get("who") or "-"),
            str(e.get("summary")) + (f" [intent {e['intent_id']}]" if e.get("intent_id") else ""),
        )
    if body.get("next_before") is not None:
        return Group(table, Text(f"older: cpctl history --before {body['next_before']}", style="dim"))
    return table


def observations(body: Json) -> RenderableType:
    rows = body.get("observations", [])
    if not rows:
        return Text("no observations", style="dim")
    table = Table(header_style="bold", title=f"fresh for {body.get('ttl_s')} s", title_justify="left")
    for column in ("region", "service", "observer", "up", "latency ms", "utilization", "age", "error"):
        table.add_column(
            column, justify="right" if column in ("latency ms", "utilization", "age") else "left"
        )
    for o in sorted(rows, key=lambda o: (o.get("region"), o.get("service"), o.get("observer"))):
        latency = o.get("latency_ms")
        util = o.get("utilization")
        age = f"{ago(float(o.get('age_s', 0)))}" + ("" if o.get("fresh") else " (expired)")
        if o.get("inconclusive"):
            # Not a witness either way: the last state, marked as such.
            state = Text(f"? (was {'up' if o.get('up') else 'down'})", style="yellow")
        else:
            state = Text("up", style="green") if o.get("up") else Text("DOWN", style="bold red")
        table.add_row(
            str(o.get("region")),
            str(o.get("service")),
            str(o.get("observer")),
            state,
            "-" if latency is None else f"{latency:.0f}",
            "-" if util is None else f"{util:.0%}",
            Text(age, style="" if o.get("fresh") else "dim"),
            str(o.get("inconclusive") or o.get("error") or ""),
        )
    return table


def decision_changes(before: Json | None, after: Json) -> list[str]:
    """What differs between two served decisions, in the words `POST /v1/plan` uses."""
    out: list[str] = []
    old_services = before.get("services", {}) if before else {}
    for service, placements in after.get("services", {}).items():
        old = old_services.get(service, {})
        for region, p in placements.items():
            q = old.get(region)
            if q is None or q.get("weight") != p.get("weight") or q.get("state") != p.get("state"):
                was = f"{q.get('weight')} {q.get('state')}" if q else "new"
                out.append(f"{region}/{service}: {was} -> {p.get('weight')} {p.get('state')}")
    old_features = before.get("features", {}) if before else {}
    for name, on in after.get("features", {}).items():
        if old_features.get(name, True) != on:
            out.append(f"feature {name}: {'on' if on else 'off'}")
    if before is not None:
        old_shed, new_shed = float(before.get("shed_fraction") or 0), float(after.get("shed_fraction") or 0)
        if old_shed != new_shed:
            out.append(f"shed fraction: {old_shed:.0%} -> {new_shed:.0%}")
        if bool(before.get("frozen")) != bool(after.get("frozen")):
            out.append(f"automation {'frozen' if after.get('frozen') else 'unfrozen'}")
        if bool(before.get("panic")) != bool(after.get("panic")):
            out.append(
                "PANIC: every region would be out; the last decision is kept"
                if after.get("panic")
                else "panic over"
            )
    return out


def plan(before: Json | None, planned: Json, what: str) -> RenderableType:
    """A plan: the change lines, the weights old -> new, the flags, and any warning."""
    parts: list[RenderableType] = [Text(f"Plan: {what}", style="bold")]
    lines = list(planned.get("changes", []))
    if lines:
        text = Text()
        for line in lines:
            text.append(f"  {line}\n")
        text.rstrip()
        parts.append(text)
    else:
        parts.append(Text("  no change to weights, features or shedding", style="dim"))
    changed = {line.split("/", 1)[1].split(":", 1)[0] for line in lines if "/" in line.split(":", 1)[0]}
    parts.append(weights_table(planned, before=before, services=changed or None))
    parts += flags_lines(planned)
    warnings = [str(r) for r in planned.get("reasons") or [] if "not applied" in str(r)]
    parts.append(reasons_block(planned, skip=warnings))
    for warning in warnings:
        parts.append(Text(f"WARNING: {warning}", style="bold red"))
    if planned.get("panic") and not (before or {}).get("panic"):
        parts.append(Text("WARNING: this would leave a service with no serving region", style="bold red"))
    return Group(*parts)


def watch_line(before: Json | None, after: Json, now: float) -> RenderableType:
    head = Text()
    head.append(f"revision {after.get('revision')}", style="bold")
    head.append(
        f"  {after.get('committed_at')}  leader {after.get('leader')}  served by {after.get('served_by')}"
    )
    if after.get("stale"):
        head.append("  STALE", style="bold red")
    if before is None:
        return Group(head, weights_table(after), *flags_lines(after), reasons_block(after))
    lines = decision_changes(before, after) or ["no change to weights or features"]
    # The reasons this revision gives that the last one did not: why it moved.
    old = {str(r) for r in before.get("reasons") or []}
    lines += [f"why: {r}" for r in after.get("reasons") or [] if str(r) not in old]
    text = Text()
    for line in lines:
        text.append(f"  {line}\n")
    text.rstrip()
    return Group(head, text)


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` without the characters a terminal would act on instead of showing."""
    return _CONTROL.sub("", text)


def json_safe(text: str) -> str:
    """JSON text with the controls that `json.dumps(ensure_ascii=False)` leaves raw escaped."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _Console(Console):
    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # The one place every character of text passes on its way out; control segments
        # are rich's own cursor moves, not text.
        return super()._render_buffer(
            segment if segment.control else Segment(printable(segment.text), segment.style)
            for segment in buffer
        )

    def on_broken_pipe(self) -> None:
        # rich exits 1 here; cpctl's exit 1 means "refused", and a reader leaving is not that.
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise OutputClosed("stdout closed by its reader")


def make_console(stderr: bool = False) -> Console:
    return _Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False, emoji=False)
