"""What can go wrong in cpctl, each with the exit code it ends with.

One line on stderr and an exit code, never a traceback: `cpctl.run` catches these at
the top and prints their message.
"""

from __future__ import annotations

from controlplane.errors import ControlplaneError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CpctlError(ControlplaneError):
    """An error cpctl reports as one line on stderr and an exit code."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageProblem(CpctlError):
    """The command line cannot work as given (exit 2, like click's usage errors)."""

    exit_code = EXIT_USAGE


class Unreachable(CpctlError):
    """No agent answered (exit 3)."""

    exit_code = EXIT_UNREACHABLE


class Refused(CpctlError):
    """An agent answered with an error: its `error` and `detail` are the message (exit 1)."""

    exit_code = EXIT_REFUSED

    def __init__(self, status: int, error: str, detail: str, endpoint: str, code: str = "") -> None:
        where = f"{endpoint} answered {status}"
        text = f"{error}: {detail}" if detail else error
        super().__init__(f"{text} ({where})")
        self.status = status
        self.error = error
        self.detail = detail
        self.code = code
        self.endpoint = endpoint


class OutputClosed(ControlplaneError):
    """stdout was closed by its reader (`cpctl history | head`): not a failure of cpctl's."""
