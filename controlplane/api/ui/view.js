// Rendering the state the page holds into its sections. Pure of I/O: main.js fetches,
// these functions draw. Server text always goes in as text (see dom.js).

import { el, svg, fill, duration, clock, percent } from "./dom.js";

/** Seconds until `at` (a time on the leader's clock), measured without comparing clocks.
 *
 * `at - decided_at` is exact (both from the leader's clock); the browser's own clock only
 * measures how long ago the page received the decision. No clock of another machine is
 * compared with the browser's.
 */
function secondsLeft(model, at) {
  const d = model.decision;
  return at - d.decided_at - (Date.now() - model.receivedAt) / 1000;
}

/** What a person should read for one placement: its state and, when recovering, how long. */
export function placementStatus(model, service, region, p) {
  const d = model.decision;
  const inPanic = (d.panic_services || []).includes(service);
  if (p.state === "down" && p.verdict !== "down" && p.serving_since && p.serving_since > d.decided_at) {
    return { kind: "recovering", text: "recovering", detail: `hold: ${duration(secondsLeft(model, p.serving_since))} left` };
  }
  if (p.weight > 0 && p.serving_since && p.ramp > 0 && p.ramp < 1) {
    const next = d.next_review_at ? `, next step in ${duration(secondsLeft(model, d.next_review_at))}` : "";
    return { kind: "recovering", text: "recovering", detail: `ramp ${percent(p.ramp)}${next}` };
  }
  const detail = inPanic && p.weight > 0 && p.verdict === "down" ? "serving in panic" : "";
  return { kind: p.state, text: p.state, detail };
}

function bar(weight, kind) {
  return svg(
    "svg",
    { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none", "aria-hidden": "true", focusable: "false" },
    svg("rect", { class: "bar-track", x: 0, y: 0, width: 100, height: 10 }),
    svg("rect", { class: `bar-fill fill-${kind}`, x: 0, y: 0, width: Math.max(0, Math.min(100, weight)), height: 10 }),
  );
}

function capacityLine(model, service, region, weight) {
  const spec = model.capacity[service]?.[region];
  if (!spec) return "";
  const demand = model.demand[service];
  if (!demand) return `capacity ${spec.capacity_rps} rps`;
  const load = (demand * weight) / 100;
  const headroom = spec.capacity_rps - load;
  const over = headroom < 0 ? " (over capacity)" : "";
  return `capacity ${Math.round(spec.capacity_rps)} rps · load ≈ ${Math.round(load)} rps · headroom ${Math.round(headroom)} rps${over}`;
}

export function renderServices(model) {
  const d = model.decision;
  const cards = Object.entries(d.services).map(([service, placements]) => {
    const panic = (d.panic_services || []).includes(service);
    const rows = Object.entries(placements).map(([region, p]) => {
      const status = placementStatus(model, service, region, p);
      return el(
        "li",
        { class: `placement state-${status.kind}`, "data-service": service, "data-region": region, "data-weight": p.weight, "data-state": status.text },
        el("span", { class: "region" }, region),
        bar(p.weight, status.kind),
        el("span", { class: "weight", "aria-label": `weight ${p.weight} of 100` }, String(p.weight)),
        el("span", { class: `badge badge-${status.kind}` }, status.text),
        el("span", { class: "detail" }, [status.detail, capacityLine(model, service, region, p.weight)].filter(Boolean).join(" · ")),
      );
    });
    return el(
      "article",
      { class: "service", "data-service": service, "aria-labelledby": `svc-${service}` },
      el("h3", { id: `svc-${service}` }, service, panic ? el("span", { class: "badge badge-panic" }, "panic") : null),
      el("ul", { class: "placements" }, rows),
    );
  });
  fill("services", cards);
}

export function renderReasons(model) {
  const reasons = model.decision.reasons || [];
  fill("reasons", reasons.length ? reasons.map((r) => el("li", {}, r)) : el("li", { class: "muted" }, "nothing to report: every region serves its base share"));
}

export function renderHeader(model) {
  const d = model.decision;
  const c = model.cluster;
  fill(
    "summary",
    el("span", {}, "agent ", el("strong", { id: "served-by" }, d ? d.served_by : "?")),
    el("span", {}, "revision ", el("strong", { id: "revision" }, d ? String(d.revision) : "?")),
    el("span", {}, "leader ", el("strong", {}, (d && d.leader) || (c && c.leader) || "none")),
    d ? el("span", {}, "committed ", clock(d.committed_at_unix)) : null,
  );
  if (c && c.cluster) document.title = `${c.cluster}: controlplane`;
}

/** How long this agent has been without quorum, counting on from what it last said. */
function staleFor(model) {
  return (model.decision.stale_s || 0) + (Date.now() - model.receivedAt) / 1000;
}

/** The once-a-second update of the banners: only the age, so a focused link keeps its focus. */
export function tickBanners(model) {
  const age = document.getElementById("stale-age");
  if (age && model.decision && model.decision.stale) age.textContent = duration(staleFor(model));
}

/** Banners: what an on-call engineer must not miss. */
export function renderBanners(model) {
  const d = model.decision;
  const out = [];
  const banner = (kind, ...children) => el("div", { class: `banner banner-${kind}`, role: kind === "stale" || kind === "lost" ? "alert" : null, "data-banner": kind }, children);
  if (model.movedFrom) {
    out.push(banner("moved", `${model.movedFrom} stopped answering, so this page moved to ${d ? d.served_by : "this agent"}. Tokens stay with the agent they were given to: paste yours again to act.`));
  }
  if (model.connection === "lost") {
    out.push(banner("lost", `Lost the connection to ${d ? d.served_by : "this agent"}; reconnecting. If it stays gone, this page moves to another agent.`));
  }
  if (d && d.stale) {
    const peer = model.readyPeer;
    const link = peer
      ? el("a", { href: `${peer.origin}/ui/`, id: "stale-peer-link", "data-agent": peer.id }, `Open ${peer.id}, which has quorum`)
      : el("span", {}, model.peerSearch ? "Looking for an agent with quorum…" : "No other agent answers with quorum.");
    out.push(
      banner(
        "stale",
        el("strong", {}, "Stale: "),
        `${d.served_by} has lost quorum (for `,
        el("span", { id: "stale-age" }, duration(staleFor(model))),
        `); it serves revision ${d.revision}, which may no longer be in force. `,
        link,
      ),
    );
  }
  if (d && d.panic) {
    const services = (d.panic_services || []).join(", ");
    const regions = Object.entries(d.panic_regions || {}).map(([s, rs]) => `${s}: ${rs.join(", ")}`).join("; ");
    out.push(banner("panic", el("strong", {}, "Panic: "), `every region of ${services} looks down; the probes are more likely wrong, so these keep serving as if healthy: ${regions}.`));
  }
  if (d && d.frozen) out.push(banner("frozen", el("strong", {}, "Frozen: "), "automation is frozen; verdicts do not change until someone unfreezes."));
  if (d && d.shed_fraction > 0) out.push(banner("shed", el("strong", {}, "Shedding: "), `${percent(d.shed_fraction)} of low-priority requests are shed.`));
  const off = d ? Object.entries(d.features || {}).filter(([, on]) => !on).map(([name]) => name) : [];
  if (off.length) out.push(banner("features", el("strong", {}, "Features off: "), off.join(", ")));
  fill("banners", out);
}

export function renderCluster(model) {
  const c = model.cluster;
  if (!c) return;
  const rows = c.members.map((m) =>
    el(
      "tr",
      { "data-agent": m.id },
      el("th", { scope: "row" }, m.id, m.id === c.agent ? el("span", { class: "badge badge-self" }, "this page") : null),
      el("td", {}, m.leader ? el("span", { class: "badge badge-leader" }, "leader") : ""),
      el("td", {}, m.id === c.agent ? "self" : m.connected ? "connected" : el("span", { class: "bad" }, "not connected")),
      el("td", {}, m.http ? el("a", { href: `${window.location.protocol}//${m.http}/ui/` }, m.http) : ""),
    ),
  );
  fill(
    "cluster",
    el(
      "p",
      { class: "facts" },
      `${c.cluster} · backend ${c.backend} · term ${c.term} · commit index ${c.commit_index} · `,
      c.has_quorum ? el("span", { class: "good" }, "quorum") : el("span", { class: "bad" }, `no quorum for ${duration(c.stale_s)}`),
    ),
    el("div", { class: "scroll-x" }, el("table", {}, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "agent"), el("th", { scope: "col" }, "role"), el("th", { scope: "col" }, "connection"), el("th", { scope: "col" }, "dashboard"))), el("tbody", {}, rows))),
  );
}

export function renderObservations(model) {
  const list = model.observations;
  if (!list) return;
  const pairs = [...new Set(list.map((o) => `${o.service}/${o.region}`))].sort();
  const observers = [...new Set(list.map((o) => o.observer))].sort();
  const index = new Map(list.map((o) => [`${o.observer}|${o.service}/${o.region}`, o]));
  const verdictOf = (pair) => {
    const [service, region] = pair.split("/");
    return model.decision?.services?.[service]?.[region]?.verdict;
  };
  const head = el("tr", {}, el("th", { scope: "col" }, "observer"), pairs.map((p) => el("th", { scope: "col" }, p)));
  const rows = observers.map((observer) =>
    el(
      "tr",
      {},
      el("th", { scope: "row" }, observer),
      pairs.map((pair) => {
        const o = index.get(`${observer}|${pair}`);
        if (!o) return el("td", { class: "obs obs-none" }, "–");
        let kind = o.up ? (verdictOf(pair) === "slow" ? "slow" : "up") : "down";
        if (!o.fresh) kind = "old";
        if (o.impaired) kind = "impaired";
        const latency = o.latency_ms === null || o.latency_ms === undefined ? "" : ` ${Math.round(o.latency_ms)} ms`;
        const tip = [o.error, o.impaired, `age ${duration(o.age_s)}`, o.fresh ? "" : "expired"].filter(Boolean).join("; ");
        return el("td", { class: `obs obs-${kind}`, title: tip }, el("span", {}, `${o.up ? "up" : "down"}${latency}`), el("small", {}, duration(o.age_s)));
      }),
    ),
  );
  fill("observations", el("table", { class: "matrix" }, el("thead", {}, head), el("tbody", {}, rows)));
}

export function renderIntents(model, onRemove) {
  const intents = model.intents || [];
  if (!intents.length) {
    fill("intents", el("p", { class: "muted" }, "No standing intents: automation decides everything."));
    return;
  }
  const target = (i) => {
    if (i.kind === "failover") return `${i.from} → ${i.to}${i.service ? ` (${i.service})` : ""}`;
    if (i.kind === "feature") return `${i.feature} ${i.enabled ? "on" : "off"}`;
    if (i.kind === "override") return `${i.service}: ${Object.entries(i.weights || {}).map(([r, w]) => `${r}=${w}`).join(", ")}`;
    if (i.region) return `${i.region}${i.service ? `/${i.service}` : ""}`;
    return "";
  };
  fill(
    "intents",
    el(
      "ul",
      { class: "intents" },
      intents.map((i) =>
        el(
          "li",
          { "data-intent": i.id },
          el("span", { class: "badge" }, i.kind),
          el("span", { class: "intent-target" }, target(i)),
          el("span", { class: "intent-reason" }, i.reason),
          el("span", { class: "muted" }, `by ${i.who} at ${clock(i.created_at)}`),
          el("button", { type: "button", class: "small", "data-action": "remove", onclick: () => onRemove(i) }, `Remove ${i.id}`),
        ),
      ),
    ),
  );
}

export function renderHistory(model) {
  const entries = model.history || [];
  fill(
    "history",
    entries.slice(0, 60).map((e) =>
      el(
        "li",
        { class: `entry entry-${e.kind}` },
        el("time", {}, clock(e.at)),
        el("span", { class: "badge" }, e.kind === "decision" ? `rev ${e.revision}` : e.kind),
        e.who ? el("span", { class: "who" }, e.who) : null,
        el("span", { class: "summary" }, e.summary),
      ),
    ),
  );
}
