"""What a drill measures, recorded while it runs and turned into stages afterwards.

Recording is plain threads over `http.client` (cpctl imports no asyncio stack): one
follower per agent with blocking queries (`?index=N&wait=...`), so every revision each
agent serves is seen with the moment it was served; one poller of the load balancers'
reports (`GET /v1/lbs`); one poller of Prometheus when a query is given. Everything
recorded is bounded. `stages()` is a pure function of the records, so the report says
exactly what was seen, and a test can feed it records.

Stages, in seconds from the drill's start (the intent sent) and, for the way back,
from its end (the intent removed, by expiry or by request). Times are this machine's
clock: commit times (cluster time) are converted with the offset measured when the
drill was committed (within half a round trip); load balancers' `applied_at` are their
hosts' clocks, which are assumed synchronised (NTP), as for any distributed trace.

- `committed`: the decision that takes the region out was committed (its cluster time);
- `served_all`: every agent serves it;
- `applied_all`: every load balancer that reported at the start has applied it (its own
  `applied_at`): the **RTO**, compared with the objective; without reporting load
  balancers the RTO is `served_all` and the report says so;
- `back_committed`, `back_weight_all` (every agent gives the region weight again,
  after the recovery hold), `back_applied_all` (the load balancers have that),
  `back_full_all` (every agent serves the region's full weight again, after the ramp).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from controlplane.cpctl.errors import CpctlError
from controlplane.cpctl.http import Client

MAX_RECORDS = 10_000
FOLLOW_WAIT_S = 5.0
LB_POLL_S = 0.2
PROMETHEUS_TIMEOUT_S = 3.0

Json = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Served:
    """One agent serving one revision: when it was seen, and what of it the drill needs."""

    agent: str
    revision: int
    seen_at: float
    committed_at: float
    intent_seq: int
    weights: Mapping[str, Mapping[str, int]]  # service -> region -> weight
    verdicts: Mapping[str, Mapping[str, str]]  # service -> region -> verdict


@dataclass(frozen=True, slots=True)
class LbSeen:
    """A load balancer's report, each time its applied revision changed."""

    name: str
    applied_revision: int | None
    applied_at: float | None
    seen_at: float
    ok: bool | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """One Prometheus sample: the query's name ("traffic", "errors") and value."""

    name: str
    at: float
    value: float | None


def served_from(agent: str, body: Json, seen_at: float) -> Served:
    services = body.get("services", {})
    return Served(
        agent=agent,
        revision=int(body["revision"]),
        seen_at=seen_at,
        committed_at=float(body.get("committed_at_unix") or 0.0),
        intent_seq=int(body.get("intent_seq", 0)),
        weights={s: {r: int(p["weight"]) for r, p in ps.items()} for s, ps in services.items()},
        verdicts={s: {r: str(p["verdict"]) for r, p in ps.items()} for s, ps in services.items()},
    )


@dataclass
class Recorder:
    """The threads that watch a drill, and what they saw (bounded, thread-safe appends)."""

    client: Client
    agents: Mapping[str, str]  # id -> base URL
    prometheus: str | None = None
    queries: Mapping[str, str] = field(default_factory=dict)  # name -> PromQL
    sample_s: float = 1.0
    served: list[Served] = field(default_factory=list)
    lbs: list[LbSeen] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # what could not be watched, and why
    lb_route: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, from_revision: int) -> None:
        for agent, url in self.agents.items():
            self._spawn(f"follow {agent}", self._follow, agent, url, from_revision)
        self._spawn("lb reports", self._poll_lbs)
        if self.prometheus and self.queries:
            self._spawn("prometheus", self._poll_prometheus)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=FOLLOW_WAIT_S + 5)

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=f"drill {name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _append(self, records: list[Any], item: Any) -> None:
        with self._lock:
            if len(records) < MAX_RECORDS:
                records.append(item)

    def _problem(self, what: str, why: str) -> None:
        with self._lock:
            self.problems.setdefault(what, why)

    def _follow(self, agent: str, url: str, revision: int) -> None:
        index = revision
        while not self._stop.is_set():
            query = {"index": str(index), "wait": f"{FOLLOW_WAIT_S:g}s"}
            try:
                r = self.client.get_from(url, "/v1/decision", query, FOLLOW_WAIT_S + 5)
            except CpctlError as e:
                self._problem(f"agent {agent}", e.message)
                self._stop.wait(0.5)
                continue
            if r.status != 200 or not isinstance(r.body, dict):
                self._problem(f"agent {agent}", f"answered {r.status}")
                self._stop.wait(0.5)
                continue
            seen = served_from(agent, r.body, time.time())
            if seen.revision > index:
                self._append(self.served, seen)
                index = seen.revision
            elif r.body.get("stale"):
                self._stop.wait(0.5)  # an agent without quorum answers at once

    def _poll_lbs(self) -> None:
        last: dict[str, tuple[Any, ...]] = {}
        while not self._stop.is_set():
            try:
                r = self.client.get("/v1/lbs", timeout_s=3.0)
            except CpctlError as e:
                if getattr(e, "status", None) == 404:
                    self.lb_route = False
                    return
                self._problem("load balancer reports", e.message)
                self._stop.wait(1.0)
                continue
            now = time.time()
            for lb in r.body.get("lbs", []) if isinstance(r.body, dict) else []:
                view = (lb.get("applied_revision"), lb.get("ok"), lb.get("error"))
                if last.get(lb["name"]) != view:
                    last[lb["name"]] = view
                    self._append(
                        self.lbs,
                        LbSeen(
                            name=str(lb["name"]),
                            applied_revision=lb.get("applied_revision"),
                            applied_at=lb.get("applied_at"),
                            seen_at=now,
                            ok=lb.get("ok"),
                            error=lb.get("error"),
                        ),
                    )
            self._stop.wait(LB_POLL_S)

    def _poll_prometheus(self) -> None:
        assert self.prometheus is not None
        while not self._stop.is_set():
            for name, query in self.queries.items():
                value = None
                try:
                    value = prometheus_value(self.prometheus, query)
                except (OSError, ValueError, KeyError, IndexError) as e:
                    self._problem(f"prometheus {name}", f"{self.prometheus}: {e}")
                self._append(self.samples, Sample(name, time.time(), value))
            self._stop.wait(self.sample_s)


def prometheus_value(base: str, query: str) -> float | None:
    """An instant query's single value (None when the answer has no series)."""
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {base!r}")
    with urllib.request.urlopen(url, timeout=PROMETHEUS_TIMEOUT_S) as response:
        body = orjson.loads(response.read(1 << 20))
    if body.get("status") != "success":
        raise ValueError(f"query failed: {body.get('error', body.get('status'))}")
    result = body["data"]["result"]
    if not result:
        return None
    return float(result[0]["value"][1])


# -- stages: pure functions of the records ---------------------------------------------------


def _pairs(drilled: Sequence[tuple[str, str]], s: Served, what: str) -> list[Any]:
    table = s.weights if what == "weight" else s.verdicts
    return [table.get(service, {}).get(region) for service, region in drilled]


def first_revision(served: Sequence[Served], after: int, test: Any) -> Served | None:
    """The lowest revision above `after` any agent served that passes `test`."""
    found = [s for s in served if s.revision > after and test(s)]
    return min(found, key=lambda s: s.revision) if found else None


def served_everywhere(served: Sequence[Served], revision: int, agents: Sequence[str]) -> float | None:
    """When the last agent served `revision` or later; None if one never did."""
    times = []
    for agent in agents:
        seen = [s.seen_at for s in served if s.agent == agent and s.revision >= revision]
        if not seen:
            return None
        times.append(min(seen))
    return max(times) if times else None


def applied_everywhere(
    lbs: Sequence[LbSeen], revision: int, names: Sequence[str]
) -> tuple[float | None, list[str]]:
    """When the last load balancer applied `revision` or later, and the ones that never did."""
    times, late = [], []
    for name in names:
        seen = [
            lb.applied_at or lb.seen_at
            for lb in lbs
            if lb.name == name and lb.applied_revision is not None and lb.applied_revision >= revision
        ]
        if seen:
            times.append(min(seen))
        else:
            late.append(name)
    return (max(times) if times and not late else None), late


@dataclass(frozen=True, slots=True)
class Timeline:
    """What a drill's stages are measured against."""

    started_at: float  # the drill intent was sent (this machine's clock, as every time here)
    ended_at: float | None  # the drill intent was removed (expiry or request)
    cluster_offset: float  # cluster time minus this machine's clock (commit times are cluster time)
    drill_seq: int  # the intent's sequence number
    base_revision: int  # the revision in force before the drill
    drilled: tuple[tuple[str, str], ...]  # (service, region) pairs
    base_weights: Mapping[str, Mapping[str, int]]  # before the drill
    agents: tuple[str, ...]
    lb_names: tuple[str, ...]  # the load balancers that reported at the start


def stages(t: Timeline, served: Sequence[Served], lbs: Sequence[LbSeen]) -> dict[str, Any]:
    """Seconds per stage (None when not reached), the revisions, and the late load balancers."""

    def since(at: float | None, start: float | None) -> float | None:
        return None if at is None or start is None else round(at - start, 3)

    def committed(s: Served | None) -> float | None:
        return None if s is None else s.committed_at - t.cluster_offset

    out: dict[str, Any] = {"revisions": {}, "late_lbs": [], "back_late_lbs": []}
    down = first_revision(
        served,
        t.base_revision,
        lambda s: s.intent_seq >= t.drill_seq and all(w == 0 for w in _pairs(t.drilled, s, "weight")),
    )
    if down is None:
        keys = ("committed", "served_all", "applied_all") if t.lb_names else ("committed", "served_all")
        return out | dict.fromkeys(keys, None)
    out["revisions"]["out"] = down.revision
    out["committed"] = since(committed(down), t.started_at)
    out["served_all"] = since(served_everywhere(served, down.revision, t.agents), t.started_at)
    if t.lb_names:
        applied, late = applied_everywhere(lbs, down.revision, t.lb_names)
        out["applied_all"] = since(applied, t.started_at)
        out["late_lbs"] = late
    if t.ended_at is None:
        return out
    back = first_revision(
        served, down.revision, lambda s: any(v != "down" for v in _pairs(t.drilled, s, "verdict"))
    )
    weight = first_revision(
        served, down.revision, lambda s: all((w or 0) > 0 for w in _pairs(t.drilled, s, "weight"))
    )
    full = first_revision(
        served,
        down.revision,
        lambda s: all(
            s.weights.get(service, {}).get(region) == t.base_weights.get(service, {}).get(region)
            for service, region in t.drilled
        ),
    )
    out["back_committed"] = since(committed(back), t.ended_at)
    out["back_weight_all"] = (
        since(served_everywhere(served, weight.revision, t.agents), t.ended_at) if weight else None
    )
    if t.lb_names:
        applied, late = applied_everywhere(lbs, weight.revision, t.lb_names) if weight else (None, [])
        out["back_applied_all"] = since(applied, t.ended_at)
        out["back_late_lbs"] = late if weight else list(t.lb_names)
    out["back_full_all"] = (
        since(served_everywhere(served, full.revision, t.agents), t.ended_at) if full else None
    )
    for name, s in (("back", back), ("weight_back", weight), ("full_back", full)):
        if s is not None:
            out["revisions"][name] = s.revision
    return out


def weight_timeline(served: Sequence[Served], agent: str, start: float) -> list[dict[str, Any]]:
    """One agent's weights at each revision it served, seconds from `start` (for the chart)."""
    return [
        {"t": round(s.seen_at - start, 3), "revision": s.revision, "weights": s.weights}
        for s in sorted((s for s in served if s.agent == agent), key=lambda s: s.revision)
    ]
