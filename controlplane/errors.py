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


class Unauthorized(ControlplaneError):
    """No credentials, or credentials this cluster does not know."""

    http_status = 401
    code = "unauthorized"


class Forbidden(ControlplaneError):
    """Known credentials that may not do this (a read token asked to write)."""

    http_status = 403
    code = "forbidden"


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


class TaskFailed(ControlplaneError):
    """A long-lived task ended (returned or raised) while it was meant to keep running."""

    def __init__(self, name: str, cause: BaseException | None) -> None:
        what = f"raised {type(cause).__name__}: {cause}" if cause else "returned"
        super().__init__(f"task {name!r} {what}")
        self.name = name
        self.cause = cause


class ProbeError(ControlplaneError):
    """A probe target answered in a way that cannot count as healthy (an unusable body)."""

    code = "probe_failed"


class LoadBalancerError(ControlplaneError):
    """A load balancer adapter could not do its part; the load balancer keeps what it has."""

    code = "lb_error"


class RenderError(LoadBalancerError):
    """A template cannot be rendered for this decision; nothing was written."""


class RuntimeApiError(LoadBalancerError):
    """HAProxy's runtime API socket could not be used (absent, refused, timed out, closed)."""
