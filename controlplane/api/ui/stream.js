// Following `/v1/watch` (server-sent events) with fetch instead of EventSource.
//
// Why not EventSource: it cannot send an Authorization header, and a read token must
// never go in a URL. A fetch stream can, and it lets the page see each failure, so it
// knows when its agent is gone (to fall back to another). Like EventSource it
// reconnects by itself and resumes with `Last-Event-ID`, so an agent that restarts is
// followed again without a reload and without missing a revision.
//
// The server sends a heartbeat comment every 15 s; a stream silent for longer than
// SILENCE_MS is taken as dead (a cut network path does not always close the socket).

import { headers, unauthorized, ApiError } from "./api.js";

const SILENCE_MS = 40000;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 2000;

export class Watch {
  /**
   * handlers: decision(data), stale(data), fresh(data), open(), down(failures, sinceMs)
   */
  constructor(path, handlers) {
    this.path = path;
    this.handlers = handlers;
    this.lastId = null;
    this.stopped = false;
    this.failures = 0;
    this.downSince = null;
    this.controller = null;
    this.wake = null;
  }

  start() {
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  /** Reconnect now (after a token was given, for example). */
  restart() {
    if (this.controller) this.controller.abort();
    if (this.wake) this.wake();
  }

  async run() {
    while (!this.stopped) {
      let opened = false;
      try {
        opened = await this.once();
      } catch {
        // A refused connection, a reset, a silent stream: all end here and retry.
      }
      if (this.stopped) return;
      if (opened) {
        this.failures = 0;
        this.downSince = null;
      }
      this.failures += 1;
      this.downSince = this.downSince ?? Date.now();
      this.handlers.down(this.failures, Date.now() - this.downSince);
      const delay = Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** Math.min(this.failures - 1, 3));
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /** One connection, until it ends. True if it was open (answered 200) at some point. */
  async once() {
    const controller = new AbortController();
    this.controller = controller;
    const extra = { Accept: "text/event-stream" };
    if (this.lastId !== null) extra["Last-Event-ID"] = this.lastId;
    const response = await fetch(this.path, { headers: headers(extra), cache: "no-store", signal: controller.signal });
    if (response.status === 401) {
      await response.body?.cancel();
      unauthorized(new ApiError(401, null, this.path));
      // Asking again every few seconds would reopen the token dialog on a person who
      // closed it: wait until a token is given (restart) instead.
      await new Promise((resolve) => {
        this.wake = resolve;
      });
      this.wake = null;
      return true;
    }
    if (!response.ok || !response.body) {
      await response.body?.cancel();
      return false;
    }
    this.failures = 0;
    this.downSince = null;
    this.handlers.open();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
    let buffer = "";
    let event = { type: "message", data: [], id: null };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
        buffer += value;
        // The SSE format: lines, an empty line ends an event (any of CRLF, LF, CR).
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === "") {
            this.dispatch(event);
            event = { type: "message", data: [], id: null };
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" ")) value = value.slice(1);
            if (field === "event") event.type = value;
            else if (field === "data") event.data.push(value);
            else if (field === "id") event.id = value;
          }
        }
      }
    } finally {
      clearTimeout(watchdog);
    }
    return true;
  }

  dispatch(event) {
    if (event.id !== null) this.lastId = event.id;
    if (event.data.length === 0) return;
    let data;
    try {
      data = JSON.parse(event.data.join("\n"));
    } catch {
      return;
    }
    const handler = this.handlers[event.type];
    if (handler) handler(data);
  }
}
