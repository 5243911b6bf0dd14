"""What a chaos run records, as plain JSON: the checker's only input.

A history is one JSON object per schedule. Times are seconds on the runner's monotonic
clock (`time.monotonic()`), the only clock every record shares; the agents' own clocks
may be faked and are never used to order anything.

- `reads`: what each agent served, from polling `GET /v1/decision` and from its
  `/v1/watch` stream. A read is an interval: the answer was produced by the agent at
  some moment between `lo` (request sent, or the previous event of the stream) and `hi`
  (answer received). Consecutive identical answers of one source are merged (`count`),
  keeping the first and last interval, so memory is bounded by changes, not by time.
- `contents`: each distinct decision content once, by hash. The content is the
  decision without what only says who serves it and how fresh it is (`SERVING_KEYS`).
- `writes`: every intent write and delete with its request, answer and timing.
- `faults`: every step the runner played, when, and what it resolved to (the agent
  that `@leader` meant, the directed Raft links cut, the backends changed).
- `final`: what every agent held after the quiet period (history, standing intents).
- `params`: the thresholds the checker judges with, derived from the config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import orjson

# Keys of a served decision that describe the serving agent, not the committed decision.
SERVING_KEYS = frozenset({"stale", "stale_s", "served_by"})


class Read(TypedDict):
    agent: str
    source: str  # "poll" | "watch"
    status: int  # HTTP status; 0 when no answer (refused, timeout)
    epoch: str | None
    revision: int | None
    stale: bool | None
    content: str | None  # hash into `contents`
    intent_seq: int | None
    first_lo: float
    first_hi: float
    last_lo: float
    last_hi: float
    count: int


class Write(TypedDict):
    step: int
    tag: str
    agent: str
    method: str  # "POST" | "DELETE"
    path: str
    body: dict[str, Any] | None
    client_id: str | None
    retry: bool
    sent: float
    received: float
    status: int  # 0 when no answer
    answer: Any


class Fault(TypedDict):
    at: float
    step: int
    episode: int
    action: str
    args: dict[str, Any]
    resolved: dict[str, Any]
    note: NotRequired[str]


class AgentFinal(TypedDict):
    reachable: bool
    decisions: dict[str, float]  # revision (as text) -> committed_at, from /v1/history
    intent_ids: list[str]  # every intent id in its history or standing
    history_complete: bool  # the history reached back to the first entry


# The recorder's poll of `/v1/decision` gives up after this long; the checker knows it to
# tell an agent that does not answer from a recorder that could not ask.
POLL_TIMEOUT_S = 1.0


class Params(TypedDict):
    detection_window_s: float  # fall x interval + timeout: a fault seen by one prober
    commit_slack_s: float  # verdict quorum, decide loop and commit, on a loaded machine
    settle_s: float  # after an agent (re)starts or the Raft topology changes
    fresh_lag_s: float  # a revision may be served as fresh this long after a newer one
    read_grace_s: float  # an agent answers reads this long after it was started
    read_outage_s: float  # reads failing longer than this while the agent is up: a violation
    write_settle_s: float  # writes must succeed once a majority has been connected this long
    observer_quorum: int


class History(TypedDict):
    seed: int
    backend: str
    agents: list[str]
    regions: list[str]
    services: list[str]
    schedule: dict[str, Any]
    params: Params
    baseline: dict[str, dict[str, int]]  # service -> region -> weight, before any fault
    started: float  # the agents were started
    faults_from: float  # the fault phase began
    healed_at: float  # every fault healed (standing intents are cleared after it)
    ended: float  # the quiet period ended
    converged_at: float | None  # when every agent first served the converged decision
    reads: list[Read]
    contents: dict[str, dict[str, Any]]
    writes: list[Write]
    faults: list[Fault]
    final: dict[str, AgentFinal]
    truncated: bool  # the recorder hit a memory bound and dropped records
    notes: list[str]


def content_of(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The committed decision inside a served one: without the serving agent's metadata."""
    return {k: v for k, v in decision.items() if k not in SERVING_KEYS}


def content_hash(content: Mapping[str, Any]) -> str:
    return hashlib.blake2b(orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=10).hexdigest()


def dumps(history: History) -> bytes:
    return orjson.dumps(history, option=orjson.OPT_INDENT_2)


def loads(data: bytes | str) -> History:
    loaded: History = orjson.loads(data)
    return loaded
