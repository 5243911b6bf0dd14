"""Following the decision from cpctl: the SDK's `Following` rules, driven over `http.client`.

`cpctl watch` and the wait after every action (until the decision carrying the intent
is served) follow the decision exactly as the load balancer adapters and `FlagsClient`
do (`controlplane.client.following`: revision fencing, moving off an agent that lost
quorum, rotation, backoff with jitter), without importing aiohttp, so that cpctl keeps
starting fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from controlplane.client.following import Following, Served, parse_answer
from controlplane.cpctl.errors import Unreachable
from controlplane.cpctl.http import Client

# Answering takes the wait plus this, at most, on a working agent.
ANSWER_MARGIN_S = 15.0


def follow(
    client: Client,
    *,
    wait_s: float,
    deadline: float | None = None,
    on_miss: Callable[[Following], None] | None = None,
) -> Iterator[Served]:
    """Each newer decision as it is served, starting with the current one.

    Stops at `deadline` (monotonic) when one is given. `on_miss` is told about every
    failed or stale answer (to say so on stderr). Raises `Unreachable` when a whole
    round of agents fails before any decision was seen.
    """
    following = Following(list(client.endpoints), wait_s=wait_s)
    while deadline is None or time.monotonic() < deadline:
        request = following.request()
        wait = wait_s if deadline is None else max(0.0, min(wait_s, deadline - time.monotonic()))
        params = {**request.params, "wait": f"{wait:.3f}s"}
        try:
            response = client.get_from(request.agent, "/v1/decision", params, wait + ANSWER_MARGIN_S)
            answer: Served | str = parse_answer(
                request.agent, response.status, response.headers, response.body
            )
        except Unreachable as e:
            answer = e.message
        if isinstance(answer, str):
            following.on_error(request.agent, answer)
            new = None
        else:
            new = following.on_served(answer)
        if new is not None:
            following.on_applied(new)
            yield new
        elif following.misses:
            if following.last is None and following.round_failed:
                raise Unreachable(f"no agent answered: {following.last_error}")
            if on_miss is not None:
                on_miss(following)
        pause = following.pause_s()
        if pause:
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
