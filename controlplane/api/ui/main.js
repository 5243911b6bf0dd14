// The dashboard: follow the decision live, fetch the rest when it changes, draw.
//
// The decision arrives only by the `/v1/watch` stream (no polling loop). When a new
// revision or a stale/fresh event arrives, the cluster, observations, intents and history
// are fetched once (coalesced, so a burst of revisions costs one round). A one-second
// timer redraws countdowns (hold and ramp time left) from what is already here; it
// fetches nothing.
//
// When this agent is gone (the stream fails for FALLBACK_AFTER_MS), the page asks the
// other configured agents' /readyz and navigates to one with quorum: see peers.js for
// why it moves rather than reading another agent's data from here.

import { $ } from "./dom.js";
import { get, onUnauthorized, session } from "./api.js";
import { Watch } from "./stream.js";
import { findPeer, peerOrigins } from "./peers.js";
import { Actions, TokenDialog } from "./actions.js";
import { addPoint, renderCharts, weightsOf } from "./chart.js";
import * as view from "./view.js";

// Long enough for an agent that restarts to come back (it is followed again where it
// was), short enough that an engineer in an outage is not left looking at a dead one.
const FALLBACK_AFTER_MS = 8000;
const HISTORY_PAGES = 5;
const HISTORY_PAGE = 500;

const model = {
  decision: null,
  receivedAt: Date.now(),
  cluster: null,
  observations: null,
  intents: null,
  history: null,
  capacity: {},
  demand: {},
  regionNames: [],
  points: new Map(),
  connection: "connecting",
  readyPeer: null,
  peerSearch: false,
  movedFrom: new URLSearchParams(location.search).get("from"),
};

let lastPeers = [];
let moving = false;

function setConnection(state) {
  model.connection = state;
  const conn = $("conn");
  conn.className = `conn conn-${state}`;
  conn.textContent = { live: "live", connecting: "connecting", lost: "reconnecting", stale: "stale" }[state] || state;
}

function drawDecision() {
  if (!model.decision) return;
  view.renderHeader(model);
  view.renderBanners(model);
  view.renderServices(model);
  view.renderReasons(model);
  renderCharts(model);
}

function drawAll() {
  drawDecision();
  view.renderCluster(model);
  view.renderObservations(model);
  view.renderIntents(model, (intent) => actions.openRemove(intent));
  view.renderHistory(model);
}

// -- fetching what goes with a revision ---------------------------------------------------

let refreshing = null;
let refreshAgain = false;

/** Fetch cluster, observations, intents and history once; coalesce calls made meanwhile. */
function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    do {
      refreshAgain = false;
      const results = await Promise.allSettled([get("/v1/cluster"), get("/v1/observations"), get("/v1/intents"), get("/v1/history?limit=100")]);
      const [cluster, observations, intents, history] = results.map((r) => (r.status === "fulfilled" ? r.value : null));
      if (cluster) {
        model.cluster = cluster;
        lastPeers = peerOrigins(cluster, cluster.agent);
      }
      if (observations) model.observations = observations.observations;
      if (intents) model.intents = intents.intents;
      if (history) mergeHistory(history.entries);
      drawAll();
    } while (refreshAgain);
  })().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

function mergeHistory(entries) {
  const byKey = new Map((model.history || []).map((e) => [`${e.kind}|${e.revision}|${e.at}|${e.intent_id}`, e]));
  for (const e of entries) {
    byKey.set(`${e.kind}|${e.revision}|${e.at}|${e.intent_id}`, e);
    if (e.kind === "decision") addPoint(model.points, e.revision, e.at, e.weights);
  }
  model.history = [...byKey.values()].sort((a, b) => b.at - a.at).slice(0, 1000);
}

/** Once, at start: the last hour of history (for the chart) and the regions' capacities. */
async function loadOnce() {
  try {
    const regions = await get("/v1/regions");
    model.regionNames = regions.regions.map((r) => r.name);
    model.demand = regions.demand_rps || {};
    for (const region of regions.regions) {
      for (const [service, spec] of Object.entries(region.services)) {
        model.capacity[service] = model.capacity[service] || {};
        model.capacity[service][region.name] = spec;
      }
    }
  } catch {
    // Drawn without capacities; the next token or reload tries again.
  }
  let before = null;
  for (let page = 0; page < HISTORY_PAGES; page += 1) {
    let answer;
    try {
      answer = await get(`/v1/history?limit=${HISTORY_PAGE}${before === null ? "" : `&before=${before}`}`);
    } catch {
      break;
    }
    mergeHistory(answer.entries);
    const oldest = answer.entries.length ? answer.entries[answer.entries.length - 1].at : null;
    const newest = model.decision ? model.decision.committed_at_unix : oldest;
    if (!answer.next_before || oldest === null || newest - oldest > 3600) break;
    before = answer.next_before;
  }
  drawAll();
}

// -- the stream ----------------------------------------------------------------------------

function onDecision(decision) {
  const revisionChanged = !model.decision || model.decision.revision !== decision.revision;
  model.decision = decision;
  model.receivedAt = Date.now();
  if (!model.regionNames.length) model.regionNames = Object.keys(Object.values(decision.services)[0] || {});
  addPoint(model.points, decision.revision, decision.committed_at_unix, weightsOf(decision));
  setConnection(decision.stale ? "stale" : "live");
  drawDecision();
  if (decision.stale) lookForReadyPeer();
  else model.readyPeer = null;
  if (revisionChanged) refresh();
}

function onStaleness(event) {
  if (!model.decision) return;
  model.decision = { ...model.decision, stale: event.stale, stale_s: event.stale_s };
  model.receivedAt = Date.now();
  setConnection(event.stale ? "stale" : "live");
  if (event.stale) lookForReadyPeer();
  else model.readyPeer = null;
  drawDecision();
  refresh();
}

/** For the stale banner: an agent that has quorum, to link to. */
async function lookForReadyPeer() {
  if (model.peerSearch) return;
  model.peerSearch = true;
  drawDecision();
  try {
    if (!lastPeers.length) await refresh();
    model.readyPeer = await findPeer(lastPeers, true);
  } finally {
    model.peerSearch = false;
    drawDecision();
  }
}

/** This agent does not answer: after FALLBACK_AFTER_MS, move the page to one that does. */
async function onDown(failures, downForMs) {
  setConnection("lost");
  view.renderBanners(model);
  if (moving || downForMs < FALLBACK_AFTER_MS || !lastPeers.length) return;
  moving = true;
  try {
    const peer = await findPeer(lastPeers, false);
    if (peer && model.connection === "lost") {
      const from = model.decision ? model.decision.served_by : "";
      location.assign(`${peer.origin}/ui/?from=${encodeURIComponent(from)}`);
      return;
    }
  } finally {
    moving = false;
  }
}

// -- wiring ------------------------------------------------------------------------------

const tokenDialog = new TokenDialog(() => {
  watch.restart();
  loadOnce();
  refresh();
});
const actions = new Actions(
  () => model,
  (why, then) => tokenDialog.open(why, then),
);
onUnauthorized(() => {
  if (!session.token()) tokenDialog.open("This cluster needs a token to read. Paste the read or the admin token.");
  else tokenDialog.open("The token was not accepted. Paste a valid read or admin token.");
});

for (const button of document.querySelectorAll("#action-buttons button")) {
  button.addEventListener("click", () => actions.open(button.dataset.kind));
}
$("token-button").addEventListener("click", () => tokenDialog.open());

const watch = new Watch("/v1/watch", {
  decision: onDecision,
  stale: onStaleness,
  fresh: onStaleness,
  open: () => {
    if (model.decision) setConnection(model.decision.stale ? "stale" : "live");
    view.renderBanners(model);
  },
  down: onDown,
}).start();

loadOnce();
// Countdowns (hold and ramp time left) and the chart's moving right edge; no fetch here.
setInterval(() => {
  if (model.decision) {
    view.renderServices(model);
    view.tickBanners(model);
    renderCharts(model);
  }
}, 1000);

// Tests and people poking in the console can see what the page holds.
window.controlplane = { model };
document.documentElement.dataset.ready = "true";
