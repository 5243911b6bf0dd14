"""The exception hierarchy.

Two families, as in Patroni: errors the daemon rides out and retries (`StoreError` and
its children: no quorum, not the leader, a lost compare-and-set), and errors that stop
it or reject a request for good (`ConfigError`, `Rejected`). The HTTP API maps each to a
status code (`http_status`) and a JSON body `{"error": ..., "detail": ...}`.
"""

from __future__ import annotations


class ControlplaneError(Exception):
    """Base of every error this package raises on purpose."""

    http_status = 500
    code = "internal"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class ConfigError(ControlplaneError):
    """The configuration is unusable; `problems` lists every `path: what (got value)`."""

    code = "bad_config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s) in configuration", "\n".join(problems))
        self.problems = problems


class Rejected(ControlplaneError):
    """A request is wrong or unsafe; nothing was changed."""

    http_status = 400
    code = "bad_request"


class NotFound(Rejected):
    http_status = 404
    code = "not_found"


class Unsafe(Rejected):
    """The request is well formed but would break a safety rule."""

    http_status = 409
    code = "unsafe"


class Overloaded(ControlplaneError):
    """This agent is at one of its limits (watchers, request size); try later or elsewhere."""

    http_status = 503
    code = "overloaded"


class StoreError(ControlplaneError):
    """The replicated store could not do it now; retrying later may work."""

    http_status = 503
    code = "store_unavailable"


class NoQuorum(StoreError):
    code = "no_quorum"


class NotLeader(StoreError):
    """Only the leader may do this. `leader` names it when known."""

    code = "not_leader"

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message, f"leader is {leader}" if leader else "leader unknown")
        self.leader = leader


class Conflict(StoreError):
    """A compare-and-set lost: someone else committed first (for example that revision)."""

    http_status = 409
    code = "conflict"
