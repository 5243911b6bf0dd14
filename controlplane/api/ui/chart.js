// Each service's weights over the last hour, as plain SVG step lines.
//
// No chart library: weights only change at a decision and hold until the next, so the
// whole chart is one step path per region on a fixed 0..100 scale, and that is less code
// than configuring a library would be (and nothing to vendor, audit and keep up to date).
// Points come from `/v1/history` (each decision entry keeps its weights) and from the
// decisions the page received live; they are keyed by revision, so the two merge.

import { el, svg, fill, clock } from "./dom.js";

const WINDOW_S = 3600;
const W = 600;
const H = 140;
const PAD = { left: 28, right: 6, top: 6, bottom: 18 };

/** Add a point (revision, time, weights by service and region) to `points` (a Map). */
export function addPoint(points, revision, at, weights) {
  if (!weights || points.has(revision)) return;
  points.set(revision, { at, weights });
  // Bounded: one hour of decisions and some slack is all the chart draws.
  if (points.size > 5000) {
    const oldest = [...points.keys()].sort((a, b) => a - b).slice(0, points.size - 5000);
    for (const key of oldest) points.delete(key);
  }
}

export function weightsOf(decision) {
  const out = {};
  for (const [service, placements] of Object.entries(decision.services || {})) {
    out[service] = Object.fromEntries(Object.entries(placements).map(([r, p]) => [r, p.weight]));
  }
  return out;
}

export function renderCharts(model) {
  const d = model.decision;
  if (!d) return;
  // The right edge is "now" on the leader's clock, estimated as the last decision's
  // time plus how long ago the page received it.
  const end = d.committed_at_unix + (Date.now() - model.receivedAt) / 1000;
  const series = [...model.points.values()].sort((a, b) => a.at - b.at);
  // A cluster younger than the hour is drawn from its first decision (at least a
  // minute), so that its few minutes are not squeezed against the right edge.
  const oldest = series.length ? series[0].at : end;
  const span = Math.min(WINDOW_S, Math.max(60, end - oldest));
  const start = end - span;
  const regionsOrder = model.regionNames;
  const x = (t) => PAD.left + ((Math.max(t, start) - start) / span) * (W - PAD.left - PAD.right);
  const y = (w) => PAD.top + (1 - w / 100) * (H - PAD.top - PAD.bottom);
  const charts = Object.keys(d.services).map((service) => {
    const lines = regionsOrder.map((region, i) => {
      // The last point before the window gives the value at its left edge.
      const visible = [];
      let before = null;
      for (const p of series) {
        const w = p.weights[service]?.[region];
        if (w === undefined) continue;
        if (p.at < start) before = { at: start, w };
        else visible.push({ at: p.at, w });
      }
      const pts = before ? [before, ...visible] : visible;
      if (!pts.length) return null;
      let path = `M${x(pts[0].at).toFixed(1)},${y(pts[0].w).toFixed(1)}`;
      for (const p of pts.slice(1)) path += ` H${x(p.at).toFixed(1)} V${y(p.w).toFixed(1)}`;
      path += ` H${x(end).toFixed(1)}`;
      return svg("path", { d: path, class: `line series-${i % 6}` });
    });
    const grid = [0, 50, 100].map((w) => [
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(w), y2: y(w), class: "grid" }),
      svg("text", { x: PAD.left - 4, y: y(w) + 3, class: "axis", "text-anchor": "end" }, String(w)),
    ]);
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
      const t = start + f * span;
      const label = f === 1 ? "now" : span < 600 ? clock(t).slice(-8) : clock(t).slice(-8, -3);
      return svg("text", { x: x(t), y: H - 4, class: "axis", "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle" }, label);
    });
    const legend = el(
      "ul",
      { class: "legend" },
      regionsOrder.map((region, i) => el("li", {}, svg("svg", { viewBox: "0 0 10 10", class: "swatch", "aria-hidden": "true" }, svg("rect", { width: 10, height: 10, class: `swatch-fill series-${i % 6}` })), region)),
    );
    return el(
      "figure",
      { class: "chart", "data-service": service },
      el("figcaption", {}, service, el("span", { class: "muted" }, span < WINDOW_S ? ` since ${clock(start)}` : " last hour")),
      svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${service} weights by region over the last hour` }, grid, lines, ticks),
      legend,
    );
  });
  fill("charts", charts);
}
