"""A drill's report: Markdown for the post-drill review, an SVG timeline, from the result JSON.

Pure functions of the result `cpctl drill` builds (and prints with `-o json`), so a
report can be rendered again later from the JSON alone.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

Json = Mapping[str, Any]

STAGE_WORDS = {
    "committed": "decision committed",
    "served_all": "served by every agent",
    "applied_all": "applied by every reporting load balancer",
    "back_committed": "way back: decision committed",
    "back_weight_all": "way back: weight again on every agent (after the hold)",
    "back_applied_all": "way back: applied by every load balancer",
    "back_full_all": "way back: full weight on every agent (after the ramp)",
}
COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _utc(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} s"


def verdict_line(result: Json) -> str:
    rto, objective = result.get("rto_s"), result["objective_s"]
    if rto is None:
        return f"FAILED: the RTO was not reached (objective {objective:g} s)"
    word = "PASSED" if result.get("passed") else "FAILED"
    return f"{word}: RTO {rto:.2f} s, objective {objective:g} s ({result['rto_measured_to']})"


def markdown(result: Json, chart_name: str | None = None) -> str:
    """The review document: what was drilled, the verdict, the stages, the LBs, the gaps."""
    scope = f"{result['region']}/{result['service']}" if result.get("service") else result["region"]
    out = [
        f"# Drill: {scope}",
        "",
        f"- **{verdict_line(result)}**",
        f"- started {_utc(result['started_at'])} by {result.get('who', '?')}: {result.get('reason', '')}",
        f"- ended {_utc(result.get('ended_at'))} ({result.get('ended_by', 'not ended')}); "
        f"planned duration {result['duration_s']:g} s",
        f"- intent `{result.get('intent_id')}`; revisions: "
        + (
            ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in result.get("stages", {}).get("revisions", {}).items()
            )
            or "none seen"
        ),
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    stages = result.get("stages", {})
    for key, words in STAGE_WORDS.items():
        if key in stages:
            out.append(f"| {words} | {_s(stages[key])} |")
    out += [
        "",
        "A drill takes the region out by intent: the probes' detection time (fall x interval",
        "+ timeout on the agents) is not in these numbers; a real failure adds it first.",
    ]
    out += ["", "## Load balancers", ""]
    lbs = result.get("lbs", [])
    if not lbs:
        out.append("No load balancer reported to the agents: the RTO is measured to the agents.")
    else:
        late = set(stages.get("late_lbs", [])) | set(stages.get("back_late_lbs", []))
        out += ["| load balancer | adapter | state at the start | on time |", "|---|---|---|---|"]
        for lb in lbs:
            out.append(
                f"| {lb['name']} | {lb.get('adapter', '?')} | {lb.get('state', '?')} | "
                f"{'LATE or failed' if lb['name'] in late else 'yes'} |"
            )
    traffic = result.get("traffic", {})
    out += ["", "## Traffic", ""]
    if traffic.get("missing"):
        out.append(f"Traffic was not measured: {traffic['missing']}.")
    else:
        for name, points in traffic.get("series", {}).items():
            values = [v for _, v in points if v is not None]
            if values:
                out.append(f"- {name}: {len(values)} samples, min {min(values):g}, max {max(values):g}")
    problems = result.get("problems", {})
    if problems:
        out += ["", "## What could not be watched", ""]
        out += [f"- {what}: {why}" for what, why in problems.items()]
    if chart_name:
        out += ["", "## Timeline", "", f"![weights during the drill]({chart_name})"]
    return "\n".join(out) + "\n"


def _step_path(points: Sequence[tuple[float, float]], x: Any, y: Any) -> str:
    parts = []
    for i, (t, v) in enumerate(points):
        if i == 0:
            parts.append(f"M{x(t):.1f},{y(v):.1f}")
        else:
            parts.append(f"H{x(t):.1f}V{y(v):.1f}")
    return " ".join(parts)


def svg(result: Json, width: int = 900) -> str:
    """Each drilled service's weights per region over time (as one agent served them),
    the drill's start, end and RTO marked; the traffic series below when measured."""
    timeline = result.get("timeline", [])
    services = sorted({s for point in timeline for s in point["weights"]})
    traffic = {k: v for k, v in result.get("traffic", {}).get("series", {}).items() if v}
    panels = [("weights", s) for s in services] + [("traffic", k) for k in traffic]
    end_t = max([p["t"] for p in timeline] + [t for series in traffic.values() for t, _ in series] + [1.0])
    end_t *= 1.05
    panel_h, top, left, right = 150, 30, 60, 150
    height = top + len(panels) * (panel_h + 30) + 20
    plot_w = width - left - right

    def x(t: float) -> float:
        return float(left + max(0.0, t) / end_t * plot_w)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{left}" y="18" font-size="14">{html.escape(verdict_line(result))}</text>',
    ]
    marks = [("drill start", 0.0), ("RTO", result.get("rto_s")), ("drill end", result.get("ended_after_s"))]
    for n, (kind, name) in enumerate(panels):
        y0 = top + n * (panel_h + 30)
        if kind == "weights":
            series: dict[str, list[tuple[float, float]]] = {}
            for point in timeline:
                for region, w in point["weights"].get(name, {}).items():
                    series.setdefault(region, []).append((point["t"], float(w)))
            top_v = 100.0
            title = f"{name}: weight per region"
        else:
            series = {name: [(t, v) for t, v in traffic[name] if v is not None]}
            top_v = max([v for pts in series.values() for _, v in pts] + [1.0]) * 1.1
            title = f"{name} (Prometheus)"

        def y(v: float, y0: float = y0, top_v: float = top_v) -> float:
            return y0 + panel_h - v / top_v * panel_h

        out.append(f'<text x="{left}" y="{y0 - 4}">{html.escape(title)}</text>')
        out.append(
            f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="none" stroke="#999"/>'
        )
        out.append(f'<text x="{left - 5}" y="{y0 + 10}" text-anchor="end">{top_v:g}</text>')
        out.append(f'<text x="{left - 5}" y="{y0 + panel_h}" text-anchor="end">0</text>')
        for label, t in marks:
            if t is not None:
                out.append(
                    f'<line x1="{x(t):.1f}" y1="{y0}" x2="{x(t):.1f}" y2="{y0 + panel_h}" stroke="#555" '
                    'stroke-dasharray="4 3"/>'
                )
                if n == 0:
                    out.append(f'<text x="{x(t) + 3:.1f}" y="{y0 + 12}">{html.escape(label)}</text>')
        for i, (label, points) in enumerate(sorted(series.items())):
            if not points:
                continue
            drawn = [*points, (end_t, points[-1][1])]
            colour = COLOURS[i % len(COLOURS)]
            out.append(
                f'<path d="{_step_path(drawn, x, y)}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            legend_y = y0 + 14 + 14 * i
            out.append(
                f'<text x="{left + plot_w + 8}" y="{legend_y}" fill="{colour}">{html.escape(label)}</text>'
            )
        out.append(
            f'<text x="{left + plot_w}" y="{y0 + panel_h + 14}" text-anchor="end">{end_t:.0f} s</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
