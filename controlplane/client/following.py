"""How to follow the committed decision across agents: the logic, without the I/O.

Every reader of the decision that must keep up with it (load balancer adapters, the
SDK's `FlagsClient`, `cpctl watch`, the demo's load balancer) long-polls one agent at a
time with a blocking query (`GET /v1/decision?index=N&wait=...`). `Following` decides
which agent to ask, what to ask, what to make of each answer, and how long to pause;
the drivers (`follower.DecisionFollower` on aiohttp, cpctl's on `http.client`) only send
the request it names and report what came back. So every reader follows the same rules:

- Revision fencing: a decision is handed out only when it is newer than the last one
  handed out, so an agent that lags can never roll a reader back. A decision from a
  new cluster epoch (a cluster rebuilt from scratch restarts its revisions) resets the
  fence: it is newer whatever its revision.
- Stale agents: an agent that has lost quorum still answers, with its last committed
  decision marked stale. Such a decision is still committed, so it is taken when it is
  newer, but the follower moves to the next agent, and keeps moving while agents answer
  stale, so it settles on an agent with quorum whenever one exists.
- Failures (no answer, an error status, not a decision) move to the next agent at once.
  Once a whole round of agents has failed or answered stale, the follower pauses before
  the next round, doubling the pause each round up to `max_backoff_s`, with jitter so
  that a fleet of readers does not come back in lockstep.
- Static stability: nothing is ever forgotten. When no agent answers, the last decision
  handed out stays the reader's (`last`), with `stale` saying so.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.model import Decision, decision_from_json

STALE_HEADER = "X-Controlplane-Stale"


@dataclass(frozen=True, slots=True)
class Served:
    """A committed decision as one agent served it."""

    decision: Decision
    agent: str
    stale: bool = False
    stale_s: float | None = None
    served_by: str = ""
    # The answer as JSON, for readers that show more than the typed decision (cpctl).
    body: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def revision(self) -> int:
        return self.decision.revision


@dataclass(frozen=True, slots=True)
class Request:
    """One blocking query to send: `GET {agent}/v1/decision?index={index}&wait={wait_s}s`."""

    agent: str
    index: int
    wait_s: float

    @property
    def params(self) -> dict[str, str]:
        return {"index": str(self.index), "wait": f"{self.wait_s:g}s"}


def parse_answer(agent: str, status: int, headers: Any, body: Any) -> Served | str:
    """What an agent's answer means: a `Served` decision, or an error in words."""
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else str(body)[:200]
        return f"HTTP {status}: {detail}"
    if not isinstance(body, dict):
        return "not a decision: the body is not a JSON object"
    try:
        decision = decision_from_json(body)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"not a decision: {e!r}"
    stale = bool(body.get("stale")) or headers.get(STALE_HEADER) is not None
    stale_s = body.get("stale_s")
    return Served(
        decision=decision,
        agent=agent,
        stale=stale,
        stale_s=float(stale_s) if isinstance(stale_s, int | float) else None,
        served_by=str(body.get("served_by", "")),
        body=body,
    )


class Following:
    """The state of one reader following the decision (see the module docstring)."""

    def __init__(
        self,
        agents: list[str],
        *,
        wait_s: float = 10.0,
        retry_s: float = 0.2,
        max_backoff_s: float = 5.0,
        rng: random.Random | None = None,
        start_at_random: bool = False,
    ) -> None:
        if not agents:
            raise ValueError("at least one agent URL is needed")
        self.agents = [a.rstrip("/") for a in agents]
        self.wait_s = wait_s
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self._rng = rng or random.Random()
        # The first agent listed is asked first (list the local one first); a fleet of
        # readers spreads its load by starting at a random one instead.
        self._current = self._rng.randrange(len(self.agents)) if start_at_random else 0
        self.last: Served | None = None  # the newest decision handed out
        self.misses = 0  # consecutive answers that failed or were stale
        self.last_error: str | None = None

    @property
    def agent(self) -> str:
        """The agent asked next."""
        return self.agents[self._current]

    @property
    def revision(self) -> int:
        return self.last.revision if self.last is not None else 0

    @property
    def stale(self) -> bool:
        """True when nothing is known, or the last answers were stale or failed everywhere."""
        if self.last is None:
            return True
        return self.misses >= len(self.agents) or (self.misses > 0 and self.last.stale)

    def request(self) -> Request:
        return Request(self.agent, self.revision, self.wait_s)

    def newer(self, served: Served) -> bool:
        """Whether `served` should be handed out: a newer revision, or a new epoch."""
        if self.last is None:
            return True
        if served.decision.epoch != self.last.decision.epoch:
            return True
        return served.revision > self.last.revision

    def on_served(self, served: Served) -> Served | None:
        """An agent answered with a decision; returns it when it is to be applied."""
        if served.stale:
            self.misses += 1
            self.last_error = f"{served.agent} has lost quorum (stale for {served.stale_s or 0:g} s)"
            self._next_agent()
        else:
            self.misses = 0
            self.last_error = None
        return served if self.newer(served) else None

    def on_applied(self, served: Served) -> None:
        """The reader took `served`; later answers must be newer than it."""
        if self.newer(served):
            self.last = served

    def on_error(self, agent: str, error: str) -> None:
        """The agent asked gave no usable answer."""
        self.misses += 1
        self.last_error = f"{agent}: {error}"
        self._next_agent()

    @property
    def round_failed(self) -> bool:
        """True right after a whole round of agents failed or answered stale."""
        return self.misses > 0 and self.misses % len(self.agents) == 0

    def pause_s(self) -> float:
        """How long to wait before the next request: only after a whole round missed."""
        if not self.round_failed:
            return 0.0
        rounds = self.misses // len(self.agents)
        pause = min(self.max_backoff_s, self.retry_s * 2 ** (rounds - 1))
        return float(pause * self._rng.uniform(0.5, 1.0))

    def _next_agent(self) -> None:
        self._current = (self._current + 1) % len(self.agents)
