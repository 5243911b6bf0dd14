"""Enforce the decision in a web application: aiohttp and ASGI middleware around a `Shedder`.

    flags = FlagsClient(agents)                       # started with the application
    shedder = Shedder.of(flags, memory_guard=MemoryGuard(0.8))
    classify = Classifier(
        low_priority_paths=["/recommendations", "/feed"],
        high_priority_paths=["/checkout", "/healthz"],
        features={"/comments": "comments", "/likes": "likes"},
    )
    app = web.Application(middlewares=[shedding_middleware(shedder, classify)])  # aiohttp
    app = SheddingMiddleware(asgi_app, shedder, classify)                          # ASGI

Each request is classified (priority, key, feature), then:

- a request for a feature the decision switched off is answered 503 with
  `X-Controlplane-Feature-Off: <name>`;
- a low-priority request whose key falls in the shed fraction is answered 503 with
  `X-Controlplane-Shed: decision|memory`;
- both with `Retry-After` (seconds) and a JSON body `{"error", "detail"}`;
- anything else, and every high-priority request, goes to the application.

Nothing here does I/O on the request path: the decision is read from memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from controlplane.client.shedding import Priority, Shedder, Verdict

Headers = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RequestClass:
    """How a request is treated: its priority, the key that places it, its feature if any."""

    priority: Priority
    key: str | None
    feature: str | None = None


class Classifier:
    """Classify by header, then path prefix.

    Priority: the `priority_header` (`high` or `low`) when present and valid, else the
    longest matching prefix of `high_priority_paths` / `low_priority_paths`, else
    `default_priority` (high: only what is marked low is ever shed). Key: the
    `key_header` (a user or session id), else the client's address. Feature: the one
    mapped to the longest matching prefix in `features`.
    """

    def __init__(
        self,
        *,
        low_priority_paths: Iterable[str] = (),
        high_priority_paths: Iterable[str] = (),
        features: Mapping[str, str] | None = None,
        priority_header: str = "X-Priority",
        key_header: str = "X-User-Id",
        default_priority: Priority = "high",
    ) -> None:
        paths: list[tuple[str, Priority]] = [(p, "high") for p in high_priority_paths]
        paths += [(p, "low") for p in low_priority_paths]
        self._paths = sorted(paths, key=lambda item: -len(item[0]))
        self._features = sorted((features or {}).items(), key=lambda item: -len(item[0]))
        self._priority_header = priority_header.lower()
        self._key_header = key_header.lower()
        self.default_priority = default_priority

    def __call__(self, path: str, headers: Headers, client: str | None) -> RequestClass:
        said = (headers.get(self._priority_header) or "").strip().lower()
        priority: Priority
        if said in ("high", "low"):
            priority = "high" if said == "high" else "low"
        else:
            priority = next(
                (p for prefix, p in self._paths if path.startswith(prefix)), self.default_priority
            )
        feature = next((f for prefix, f in self._features if path.startswith(prefix)), None)
        key = headers.get(self._key_header) or client
        return RequestClass(priority, key, feature)


Classify = Callable[[str, Headers, str | None], RequestClass]


def refusal(verdict: Verdict, retry_after_s: int) -> tuple[dict[str, str], bytes]:
    """The headers and JSON body of a 503 for a refused request."""
    headers = {"Retry-After": str(retry_after_s), "Content-Type": "application/json"}
    if verdict.why == "feature":
        headers["X-Controlplane-Feature-Off"] = str(verdict.feature)
        body = {"error": "feature off", "detail": f"{verdict.feature} is switched off for now"}
    else:
        headers["X-Controlplane-Shed"] = verdict.why
        body = {
            "error": "shed",
            "detail": f"low-priority request shed ({verdict.why}, fraction {verdict.fraction:.3f})",
        }
    return headers, orjson.dumps(body)


# -- aiohttp --------------------------------------------------------------------------------


def shedding_middleware(shedder: Shedder, classify: Classify | None = None) -> Middleware:
    """An aiohttp middleware that refuses what `shedder` says to, before the handler runs."""
    classify = classify or Classifier()

    @web.middleware
    async def shed(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        c = classify(request.path, request.headers, request.remote)
        verdict = shedder.check(c.key, c.priority, c.feature)
        if not verdict.shed:
            return await handler(request)
        headers, body = refusal(verdict, shedder.retry_after_s)
        return web.Response(status=503, body=body, headers=headers)

    return shed


# -- ASGI -----------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SheddingMiddleware:
    """ASGI middleware (Starlette, FastAPI, any ASGI 3 app) doing what `shedding_middleware` does."""

    def __init__(self, app: ASGIApp, shedder: Shedder, classify: Classify | None = None) -> None:
        self.app = app
        self.shedder = shedder
        self.classify = classify or Classifier()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        client = scope.get("client")
        c = self.classify(str(scope.get("path", "")), headers, str(client[0]) if client else None)
        verdict = self.shedder.check(c.key, c.priority, c.feature)
        if not verdict.shed:
            await self.app(scope, receive, send)
            return
        extra, body = refusal(verdict, self.shedder.retry_after_s)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 503, "headers": raw})
        await send({"type": "http.response.body", "body": body})
