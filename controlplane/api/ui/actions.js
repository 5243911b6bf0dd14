// Operator actions, the way cpctl does them: fill in, see the plan (POST /v1/plan,
// which commits nothing), confirm, commit (POST /v1/intents with an id chosen here, so
// a retry commits once), and say which revision carries it.
//
// Dialogs are native <dialog>s opened with showModal(): the rest of the page is inert
// and Escape closes them. Tab and Shift+Tab are also wrapped inside the dialog, so that
// keyboard focus never leaves it for the browser's own controls while it is open.

import { el, fill, $, percent } from "./dom.js";
import { session, post, call, newIntentId, ApiError } from "./api.js";

const KINDS = {
  drain: { title: "Drain a region", verb: "Drain", fields: ["region", "service"] },
  undrain: { title: "Undrain a region", verb: "Undrain", fields: ["region", "service"] },
  failover: { title: "Fail over", verb: "Fail over", fields: ["from", "to", "service"] },
  feature: { title: "Switch a feature", verb: "Switch", fields: ["name", "enabled"] },
  freeze: { title: "Freeze automation", verb: "Freeze", fields: [] },
  unfreeze: { title: "Unfreeze automation", verb: "Unfreeze", fields: [] },
  whatif: { title: "What if regions failed?", verb: "", fields: ["fail"] },
};

const FOCUSABLE = "a[href], button:not([disabled]), input:not([disabled]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex='-1'])";

/** Keep Tab inside `dialog`, give focus back to whatever opened it when it closes. */
export function trapFocus(dialog) {
  dialog.addEventListener("keydown", (event) => {
    if (event.key !== "Tab") return;
    const items = [...dialog.querySelectorAll(FOCUSABLE)].filter((n) => !n.hidden && n.offsetParent !== null);
    if (!items.length) return;
    const first = items[0];
    const last = items[items.length - 1];
    if (event.shiftKey && document.activeElement === first) {
      last.focus();
      event.preventDefault();
    } else if (!event.shiftKey && document.activeElement === last) {
      first.focus();
      event.preventDefault();
    }
  });
}

function openModal(dialog) {
  const opener = document.activeElement;
  dialog.addEventListener(
    "close",
    () => {
      if (opener && opener.isConnected && typeof opener.focus === "function") opener.focus();
    },
    { once: true },
  );
  dialog.showModal();
}

function options(values, labels) {
  return values.map((v, i) => el("option", { value: v }, labels ? labels[i] : v));
}

function field(label, control) {
  return el("label", { class: "field" }, el("span", {}, label), control);
}

/** The form fields of one kind of action, from what the decision names. */
function fieldsFor(kind, model, preset) {
  const regions = model.regionNames;
  const services = Object.keys(model.decision.services);
  const features = Object.keys(model.decision.features || {});
  const out = [];
  for (const name of KINDS[kind].fields) {
    if (name === "region" || name === "from" || name === "to") {
      const label = { region: "Region", from: "From region", to: "To region" }[name];
      const select = el("select", { name, required: true }, options(regions));
      if (preset[name]) select.value = preset[name];
      else if (name === "to" && regions.length > 1) select.value = regions[1];
      out.push(field(label, select));
    } else if (name === "service") {
      out.push(field("Service", el("select", { name }, options(["", ...services], ["every service", ...services]))));
    } else if (name === "name") {
      out.push(field("Feature", el("select", { name, required: true }, options(features))));
    } else if (name === "enabled") {
      out.push(field("Switch it", el("select", { name }, options(["false", "true"], ["off", "on"]))));
    } else if (name === "fail") {
      out.push(
        el(
          "fieldset",
          { class: "field" },
          el("legend", {}, "Regions that fail"),
          regions.map((r) => el("label", { class: "check" }, el("input", { type: "checkbox", name: "fail", value: r }), r)),
        ),
      );
    }
  }
  if (kind !== "whatif") {
    out.push(field("Reason (recorded, shown in history)", el("input", { name: "reason", required: true, maxlength: 500, autocomplete: "off" })));
  }
  return out;
}

function intentBody(kind, form) {
  const data = new FormData(form);
  const reason = String(data.get("reason") || "").trim();
  if (kind === "drain" || kind === "undrain") {
    return { kind, region: data.get("region"), service: data.get("service") || null, reason };
  }
  if (kind === "failover") {
    return { kind, from: data.get("from"), to: data.get("to"), service: data.get("service") || null, reason };
  }
  if (kind === "feature") return { kind, name: data.get("name"), enabled: data.get("enabled") === "true", reason };
  return { kind, reason };
}

function planView(model, planned) {
  const changes = planned.changes || [];
  const refusals = planned.refusals || [];
  const featuresOff = changes.filter((c) => /^feature .*: off$/.test(c)).map((c) => c.slice(8, -5));
  const moves = changes.filter((c) => !c.startsWith("feature "));
  const parts = [el("h3", {}, "Plan (nothing is committed yet)")];
  parts.push(el("h4", {}, "What would move"), moves.length ? el("ul", { class: "changes" }, moves.map((c) => el("li", {}, c))) : el("p", { class: "muted" }, "No weight would change."));
  if (featuresOff.length) parts.push(el("h4", {}, "Features that would go off"), el("ul", { class: "changes" }, featuresOff.map((f) => el("li", {}, f))));
  if (planned.shed_fraction > 0) parts.push(el("p", { class: "bad" }, `${percent(planned.shed_fraction)} of low-priority requests would be shed.`));
  if (planned.panic) parts.push(el("p", { class: "bad" }, `Panic: ${(planned.panic_services || []).join(", ")} would have no region the probes call healthy.`));
  if (refusals.length) parts.push(el("h4", { class: "bad" }, "Refused"), el("ul", { class: "refusals" }, refusals.map((r) => el("li", {}, r))));
  const rows = [];
  for (const [service, placements] of Object.entries(planned.services || {})) {
    const before = model.decision.services[service] || {};
    const cells = Object.entries(placements).map(([region, p]) => {
      const was = before[region] ? before[region].weight : "–";
      return `${region} ${was}→${p.weight}`;
    });
    rows.push(el("li", {}, el("strong", {}, service), ` ${cells.join(", ")}`));
  }
  parts.push(el("h4", {}, "Weights after"), el("ul", { class: "after" }, rows));
  return parts;
}

export class Actions {
  constructor(getModel, askToken) {
    this.getModel = getModel;
    this.askToken = askToken;
    this.dialog = $("action-dialog");
    this.form = $("action-form");
    this.commitButton = $("action-commit");
    this.planButton = $("action-plan");
    this.cancelButton = $("action-cancel");
    this.planned = null;
    this.kind = null;
    this.removing = null;
    trapFocus(this.dialog);
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.showPlan();
    });
    // Any edit after a plan was shown makes that plan stale: plan again before committing.
    this.form.addEventListener("input", () => this.invalidate());
    this.commitButton.addEventListener("click", () => this.commit());
    this.cancelButton.addEventListener("click", () => this.dialog.close());
  }

  invalidate() {
    if (this.removing) return;
    this.planned = null;
    this.commitButton.disabled = true;
    this.commitButton.hidden = this.kind === "whatif";
  }

  /** Open the dialog for `kind` (a key of KINDS); `preset` fills fields in. */
  open(kind, preset = {}) {
    const model = this.getModel();
    if (!model.decision) return;
    if (kind !== "whatif" && !session.token()) {
      this.askToken("Paste the admin token to act. It stays in this tab only (session storage).", () => this.open(kind, preset));
      return;
    }
    this.kind = kind;
    this.removing = null;
    fill("action-title", KINDS[kind].title);
    fill("action-fields", fieldsFor(kind, model, preset));
    fill("plan");
    fill("action-result");
    this.planButton.hidden = false;
    this.planButton.textContent = kind === "whatif" ? "Show what would happen" : "Show plan";
    this.cancelButton.textContent = "Cancel";
    this.invalidate();
    openModal(this.dialog);
    const first = this.form.querySelector("select, input");
    if (first) first.focus();
  }

  /** Removing an intent: the API has no plan for a removal, so show the intent (as cpctl does). */
  openRemove(intent) {
    if (!session.token()) {
      this.askToken("Paste the admin token to act. It stays in this tab only (session storage).", () => this.openRemove(intent));
      return;
    }
    this.kind = "remove";
    this.removing = intent;
    fill("action-title", `Remove intent ${intent.id}`);
    fill(
      "action-fields",
      el("p", {}, `${intent.kind} `, el("strong", {}, intent.region || intent.feature || intent.from || intent.service || ""), ` by ${intent.who}: `, el("q", {}, intent.reason)),
      el("p", { class: "muted" }, "Automation decides again for what it covered (a drained region comes back through its recovery hold and ramp)."),
      field("Reason (recorded, shown in history)", el("input", { name: "reason", required: true, maxlength: 500, autocomplete: "off" })),
    );
    fill("plan");
    fill("action-result");
    this.planButton.hidden = true;
    this.commitButton.hidden = false;
    this.commitButton.disabled = false;
    this.commitButton.textContent = "Remove";
    this.cancelButton.textContent = "Cancel";
    openModal(this.dialog);
    this.form.querySelector("input").focus();
  }

  async showPlan() {
    const model = this.getModel();
    if (this.removing) return this.commit();
    if (!this.form.reportValidity()) return;
    const kind = this.kind;
    const request = kind === "whatif" ? { fail: new FormData(this.form).getAll("fail"), intents: [] } : { intents: [intentBody(kind, this.form)] };
    fill("plan", el("p", { class: "muted" }, "Planning…"));
    try {
      const planned = await post("/v1/plan", request);
      fill("plan", planView(model, planned));
      if (kind === "whatif") return;
      this.planned = { body: request.intents[0], planned };
      const refused = (planned.refusals || []).length > 0;
      this.commitButton.textContent = refused ? "Refused: cannot commit" : `Commit: ${KINDS[kind].verb.toLowerCase()}`;
      this.commitButton.disabled = refused;
      this.commitButton.hidden = false;
      (refused ? this.cancelButton : this.commitButton).focus();
    } catch (e) {
      fill("plan", el("p", { class: "bad", role: "alert" }, `No plan: ${e.message}`));
    }
  }

  async commit() {
    if (this.commitButton.disabled) return;
    if (!this.form.reportValidity()) return;
    this.commitButton.disabled = true;
    fill("action-result", el("p", { class: "muted" }, "Committing…"));
    try {
      let answer;
      if (this.removing) {
        const reason = String(new FormData(this.form).get("reason") || "").trim();
        answer = await call("DELETE", `/v1/intents/${encodeURIComponent(this.removing.id)}`, { reason });
        fill("action-result", el("p", { class: "good", role: "status" }, `Removed intent ${this.removing.id}; in force in revision ${answer.revision ?? "(not served here yet)"}.`));
      } else {
        if (!this.planned) return;
        const body = { ...this.planned.body, id: newIntentId() };
        answer = await this.postIntent(body);
        const where = answer.revision !== null && answer.revision !== undefined ? `in force in revision ${answer.revision}` : "committed; not served here yet";
        fill("action-result", el("p", { class: "good", role: "status", "data-intent": answer.id }, `Committed intent ${answer.id}: ${where}.`));
      }
      this.commitButton.hidden = true;
      this.planButton.hidden = true;
      this.cancelButton.textContent = "Close";
      this.cancelButton.focus();
    } catch (e) {
      const hint = e instanceof ApiError && (e.status === 401 || e.status === 403) ? " (is it the admin token?)" : "";
      fill("action-result", el("p", { class: "bad", role: "alert" }, `Not committed: ${e.message}${hint}`));
      this.commitButton.disabled = false;
    }
  }

  /** POST an intent; once more with the same id if no answer came (it commits once). */
  async postIntent(body) {
    try {
      return await post("/v1/intents", body);
    } catch (e) {
      if (e instanceof ApiError && e.status === 0) return post("/v1/intents", body);
      throw e;
    }
  }
}

/** The token dialog: paste a token (and who you are), kept in session storage. */
export class TokenDialog {
  constructor(onSaved) {
    this.dialog = $("token-dialog");
    this.form = $("token-form");
    this.onSaved = onSaved;
    this.then = null;
    trapFocus(this.dialog);
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const data = new FormData(this.form);
      session.save(String(data.get("token") || "").trim(), String(data.get("who") || "").trim());
      this.dialog.close();
      this.onSaved();
      const then = this.then;
      this.then = null;
      if (then) then();
    });
    $("token-forget").addEventListener("click", () => {
      session.save("", "");
      this.form.reset();
      this.dialog.close();
      this.onSaved();
    });
    $("token-cancel").addEventListener("click", () => this.dialog.close());
  }

  open(why, then) {
    if (this.dialog.open) return;
    this.then = then || null;
    fill("token-why", why || "A token is kept in this tab only (session storage) and sent as a bearer header.");
    this.form.elements.token.value = "";
    this.form.elements.who.value = session.who();
    openModal(this.dialog);
    this.form.elements.token.focus();
  }
}
