// The agent's HTTP API, from the page: same origin only, token as a bearer header.
//
// The token is kept in sessionStorage: it lives as long as the tab, is never written to
// disk by the page, never put in a URL, and belongs to this agent's origin only (when
// the page moves to another agent, the person pastes it again there; a secret is not
// carried across origins).

const TOKEN_KEY = "controlplane.token";
const WHO_KEY = "controlplane.who";
const TIMEOUT_MS = 10000;

export class ApiError extends Error {
  constructor(status, body, path) {
    const text = body && body.error ? `${body.error}${body.detail ? `: ${body.detail}` : ""}` : `HTTP ${status}`;
    super(text);
    this.status = status;
    this.body = body;
    this.path = path;
  }
}

export const session = {
  token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  who() {
    return sessionStorage.getItem(WHO_KEY) || "";
  },
  save(token, who) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    if (who) sessionStorage.setItem(WHO_KEY, who);
    else sessionStorage.removeItem(WHO_KEY);
  },
};

/** Headers every request carries: the bearer token when one was given, who is acting. */
export function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  const token = session.token();
  if (token) out.Authorization = `Bearer ${token}`;
  const who = session.who();
  // Recorded with intents as `who`, like cpctl's user@host.
  out["X-Controlplane-User"] = who ? `${who} (dashboard)` : "dashboard";
  return out;
}

// Listeners told when the API answers 401: the page then asks for a token.
const unauthorizedListeners = new Set();
export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}
export function unauthorized(error) {
  for (const listener of unauthorizedListeners) listener(error);
}

/** One request; resolves with the JSON body, throws ApiError (status 0: no answer). */
export async function call(method, path, body) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal: controller.signal,
    });
  } catch (e) {
    throw new ApiError(0, { error: "no answer", detail: String(e && e.message ? e.message : e) }, path);
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data, path);
    if (response.status === 401) unauthorized(error);
    throw error;
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const del = (path) => call("DELETE", path);

/** A random id for a new intent: a retry with the same id commits once. */
export function newIntentId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
