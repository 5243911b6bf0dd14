"""The `prometheus` probe: a region's health from its metrics, through PromQL.

One `PrometheusCheck` per target runs its queries against Prometheus' HTTP API
(`POST /api/v1/query`) every interval:

- the **down** query, whose value meeting the condition (`== 0`, `> 0.05`)
  continuously for `down_for_s` (Prometheus' `for:`) makes the probe a failure; while
  it has held for less, the probe succeeds (the rule is pending, as an alert is);
- the optional **slow** query, a latency in seconds, reported as the probe's latency,
  which the decision compares with `slow_ms`;
- the optional **utilization** query, a fraction 0..1 (memory used / limit), which
  feeds the gray-failure rule like the `utilization` an HTTP target reports.

Rise/fall counting then applies as for every probe (`health.py`).

**Inconclusive, never down.** When no server answers (refused, timed out, 5xx), a
server rejects the query, the answer is not what the API promises, or the down query
returns no sample at all (an empty vector: the series are gone, the scrape never
happened, a label is misspelt), the probe cannot tell whether the region is down. It
then says so (`prometheus unreachable: inconclusive`, `prometheus: empty answer:
inconclusive`) and counts neither way: a Prometheus outage must never look like a
region outage. A pending `for` is kept through inconclusive probes (its clock keeps
running), but is reset by a conclusive answer that does not meet the condition. Slow
and utilization queries that fail only leave those values out.

**Bounded.** All of a probe's queries together take at most `target.timeout_s`:
servers are tried in order, starting with the last one that answered, each with an
equal share of the time left, and Prometheus is told the same limit (`timeout=`). An
answer is read up to `MAX_ANSWER_BYTES` and no further (over it: inconclusive).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from controlplane.errors import ProbeError
from controlplane.probes.checks import read_bounded
from controlplane.probes.target import ProbeResult, ProbeTarget, PrometheusProbe

MAX_ANSWER_BYTES = 256 * 1024
# Below this a query is not worth sending: the answer could not arrive in time.
_MIN_ATTEMPT_S = 0.02
_HEADERS = {"User-Agent": "controlplane-probe/1", "Accept": "application/json"}

# Errors about the server's state rather than the query: another server may answer.
_SERVER_TROUBLE = frozenset({"timeout", "canceled", "unavailable", "internal"})

UNREACHABLE = "prometheus unreachable: inconclusive"
EMPTY = "prometheus: empty answer: inconclusive"


class _Unreachable(ProbeError):
    """This server gave no usable answer; the next one may."""


class _Rejected(ProbeError):
    """The server answered, but with an error about the query: another server would too."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What one query returned: its sample values (NaN dropped); empty when none."""

    values: tuple[float, ...]

    def worst(self, higher_is_worse: bool = True) -> float | None:
        if not self.values:
            return None
        return max(self.values) if higher_is_worse else min(self.values)


def parse_answer(body: bytes) -> Answer:
    """Sample values from a `/api/v1/query` answer; `_Rejected`/`_Unreachable` if it is not one.

    A vector gives one value per series, a scalar one value; NaN samples are dropped (as a
    comparison in PromQL drops them). A matrix or a string is a query that cannot be a
    health rule: rejected.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Unreachable("not JSON") from None
    if not isinstance(data, dict):
        raise _Unreachable("not a JSON object")
    if data.get("status") == "error":
        error_type = str(data.get("errorType", "error"))
        if error_type in _SERVER_TROUBLE:
            raise _Unreachable(error_type)
        raise _Rejected(f"{error_type}: {str(data.get('error', ''))[:200]}")
    result = data.get("data")
    if data.get("status") != "success" or not isinstance(result, dict):
        raise _Unreachable("not a query answer")
    kind, items = result.get("resultType"), result.get("result")
    samples: list[Any]
    if kind == "scalar" and isinstance(items, list) and len(items) == 2:
        samples = [items]
    elif kind == "vector" and isinstance(items, list):
        samples = [item.get("value") if isinstance(item, dict) else None for item in items]
    elif kind in ("matrix", "string"):
        raise _Rejected(f"the query returns a {kind}; a health rule needs an instant vector or a scalar")
    else:
        raise _Unreachable("not a query answer")
    values = []
    for sample in samples:
        if not isinstance(sample, list) or len(sample) != 2:
            raise _Unreachable("bad sample")
        try:
            value = float(sample[1])
        except (TypeError, ValueError):
            raise _Unreachable("bad sample value") from None
        if not math.isnan(value):
            values.append(value)
    return Answer(tuple(values))


class PrometheusCheck:
    """Probes one `prometheus` target; keeps the pending `for` and the preferred server.

    `clock` is monotonic seconds (injectable so that `for` can be tested without sleeping).
    """

    def __init__(self, target: ProbeTarget, clock: Callable[[], float] = time.monotonic) -> None:
        if target.prometheus is None:
            raise ValueError(f"{target.region}/{target.service}: not a prometheus target")
        self.target = target
        self.spec: PrometheusProbe = target.prometheus
        self._clock = clock
        self._preferred = 0
        self.pending_since: float | None = None  # when the down condition started holding
        self.server: str | None = None  # the server that answered last

    async def check(self, session: aiohttp.ClientSession) -> ProbeResult:
        started = self._clock()
        deadline = started + self.target.timeout_s
        queries = [self.spec.down_query]
        for extra in (self.spec.slow_query, self.spec.utilization_query):
            if extra is not None:
                queries.append(extra)
        try:
            answers = await self._ask(session, queries, deadline)
        except _Rejected as e:
            return self._inconclusive(started, f"prometheus rejected the query ({e}): inconclusive")
        except _Unreachable:
            return self._inconclusive(started, UNREACHABLE)

        down = answers[0]
        if isinstance(down, Exception) or not down.values:
            # Only the down query decides whether the probe can tell anything.
            return self._inconclusive(started, EMPTY if isinstance(down, Answer) else UNREACHABLE)
        now = self._clock()
        if any(self.spec.down_when.holds(v) for v in down.values):
            if self.pending_since is None:
                self.pending_since = now
        else:
            self.pending_since = None
        extras = iter(answers[1:])
        latency_ms = utilization = None
        if self.spec.slow_query is not None:
            slow = next(extras)
            seconds = slow.worst() if isinstance(slow, Answer) else None
            if seconds is not None and math.isfinite(seconds):
                latency_ms = max(seconds, 0.0) * 1000.0
        if self.spec.utilization_query is not None:
            busy = next(extras)
            fraction = busy.worst() if isinstance(busy, Answer) else None
            if fraction is not None:
                utilization = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 1.0
        duration = self._clock() - started
        if self.pending_since is not None and now - self.pending_since >= self.spec.down_for_s:
            return ProbeResult(False, duration, self.spec.describe_down())
        return ProbeResult(
            True,
            duration,
            utilization=utilization,
            reported_latency_ms=latency_ms,
            latency_from_metrics=True,
        )

    def _inconclusive(self, started: float, why: str) -> ProbeResult:
        return ProbeResult(False, self._clock() - started, why, inconclusive=True)

    async def _ask(
        self, session: aiohttp.ClientSession, queries: list[str], deadline: float
    ) -> list[Answer | Exception]:
        """Every query from one server, failing over to the next while time is left.

        The down query's answer decides whether a server answered: when it is
        unreachable the next server is asked for all of them. Raises `_Unreachable`
        when no server answered, `_Rejected` when one rejected the down query.
        """
        servers = self.spec.servers
        order = [servers[(self._preferred + i) % len(servers)] for i in range(len(servers))]
        for i, server in enumerate(order):
            remaining = deadline - self._clock()
            share = remaining / (len(order) - i)
            if share < _MIN_ATTEMPT_S:
                break
            results = await asyncio.gather(
                *(self._query(session, server, q, share) for q in queries), return_exceptions=True
            )
            first = results[0]
            if isinstance(first, _Rejected):
                raise first
            if isinstance(first, BaseException):
                if not isinstance(first, _Unreachable | asyncio.TimeoutError):
                    raise first
                continue
            self._preferred = servers.index(server)
            self.server = server
            return [r if isinstance(r, Answer) else Exception(str(r)) for r in results]
        raise _Unreachable("no server answered")

    async def _query(
        self, session: aiohttp.ClientSession, server: str, query: str, budget_s: float
    ) -> Answer:
        url = f"{server.rstrip('/')}/api/v1/query"
        # Prometheus durations are integers with units ("400ms"); "0.400s" is refused.
        form = {"query": query, "timeout": f"{max(1, int(budget_s * 1000))}ms"}
        try:
            async with (
                asyncio.timeout(budget_s),
                session.post(
                    url,
                    data=form,
                    headers=_HEADERS,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=budget_s),
                ) as response,
            ):
                body = await read_bounded(response.content, MAX_ANSWER_BYTES)
                if body is None:
                    raise _Unreachable(f"answer over {MAX_ANSWER_BYTES // 1024} KiB")
                status = response.status
        except TimeoutError:
            raise _Unreachable("timeout") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Unreachable(type(e).__name__) from None
        if status >= 500 or status == 429:
            raise _Unreachable(f"HTTP {status}")
        answer = parse_answer(body)
        if status != 200:
            raise _Unreachable(f"HTTP {status}")
        return answer
