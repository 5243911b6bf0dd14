"""cpctl: the operator's command line, the tool an SRE types during an outage.

It talks to any agent over the HTTP API (`--endpoint`, repeatable, or CPCTL_ENDPOINT;
the token from CPCTL_TOKEN or --token-file) and moves on to the next agent when one
is unreachable. Every failure is one line on stderr and an exit code, never a
traceback (`--debug` shows one for an unexpected error):

    0  done
    1  refused by the agent (its error and detail are shown), or not confirmed
    2  usage error (a bad option, or a confirmation asked of something not a terminal)
    3  no agent reachable, or none answered as an agent does (or one went away after a
       write was sent)
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

import click

from controlplane.cpctl import actions, drill  # noqa: F401 - registers the commands that change traffic
from controlplane.cpctl.commands import cli
from controlplane.cpctl.errors import EXIT_REFUSED, EXIT_USAGE, CpctlError, OutputClosed
from controlplane.cpctl.render import printable

__all__ = ["cli", "main"]

EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> int:
    # The message may quote an agent's error text: no terminal control gets through.
    click.echo(printable(f"cpctl: {message}"), err=True)
    return code


def run(args: Sequence[str] | None = None) -> int:
    """Run cpctl with `args` (default: sys.argv[1:]) and return its exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or bool(os.environ.get("CPCTL_DEBUG"))
    try:
        code = cli.main(argv, prog_name="cpctl", standalone_mode=False)
        sys.stdout.flush()
    except click.UsageError as e:
        e.show()
        return EXIT_USAGE
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort as e:
        # click turns Ctrl-C into Abort; EOF at a confirmation prompt is an Abort too.
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _fail("interrupted", EXIT_INTERRUPTED)
        return _fail("aborted: nothing was committed", EXIT_REFUSED)
    except CpctlError as e:
        if debug:
            traceback.print_exc()
        return _fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except (BrokenPipeError, OutputClosed):
        # `cpctl history | head`: the reader left; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug:
            traceback.print_exc()
        return _fail(f"unexpected error: {type(e).__name__}: {e} (run with --debug for the traceback)", 1)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())
