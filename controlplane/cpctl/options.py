"""Options every cpctl command accepts, before or after its name.

`cpctl -o json status` and `cpctl status -o json` mean the same: the global options
are declared on the group and again on every command (a value given after the
command's name wins), the way kubectl's and etcdctl's flags work anywhere. Each
command's help lists them in a section of their own, under its own options.
"""

from __future__ import annotations

import getpass
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from controlplane.cpctl.errors import OutputClosed, UsageProblem
from controlplane.cpctl.http import Client, normalize_endpoint

DEFAULT_ENDPOINTS = ("http://127.0.0.1:8701", "http://127.0.0.1:8702", "http://127.0.0.1:8703")
DEFAULT_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    """What the global options say, resolved against the environment when first used."""

    endpoints: tuple[str, ...] = ()
    token_file: Path | None = None
    user: str | None = None
    output: str | None = None
    timeout_s: float | None = None
    debug: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    _client: Client | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return self.output == "json"

    def resolved_endpoints(self) -> list[str]:
        given: Sequence[str] = self.endpoints
        if not given:
            env = os.environ.get("CPCTL_ENDPOINT", "")
            given = [e for e in env.replace(" ", ",").split(",") if e.strip()] or DEFAULT_ENDPOINTS
        out: list[str] = []
        for item in given:
            # `--endpoint a,b` is accepted too: people paste CPCTL_ENDPOINT's value.
            for part in item.split(","):
                if part.strip():
                    endpoint = normalize_endpoint(part)
                    if endpoint not in out:
                        out.append(endpoint)
        return out

    def token(self) -> str | None:
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise UsageProblem(f"cannot read --token-file {self.token_file}: {e.strerror or e}") from None
            if not text:
                raise UsageProblem(f"--token-file {self.token_file} is empty")
            return text
        return os.environ.get("CPCTL_TOKEN", "").strip() or None

    def who(self) -> str:
        if self.user:
            return self.user
        try:
            name = getpass.getuser()
        except (OSError, KeyError):
            name = "unknown"
        return f"{name}@{socket.gethostname()}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https endpoints from --ca-file/--cert-file/--key-file; None: defaults."""
        from controlplane.client.tls import TlsFilesError, client_context

        # Given on the command line wins over the environment (read here, not by click,
        # so that an option before the command is not overridden by the variable).
        ca_file = self.ca_file or _env_path("CPCTL_CA_FILE")
        cert_file = self.cert_file or _env_path("CPCTL_CERT_FILE")
        key_file = self.key_file or _env_path("CPCTL_KEY_FILE")
        if ca_file is None and cert_file is None and key_file is None:
            return None
        if (cert_file is None) != (key_file is None):
            given = "--cert-file" if cert_file is not None else "--key-file"
            raise UsageProblem(f"{given} needs the other: give --cert-file and --key-file together")
        try:
            return client_context(ca_file, cert_file, key_file)
        except TlsFilesError as e:
            raise UsageProblem(f"TLS files: {e}") from None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(
                self.resolved_endpoints(),
                token=self.token(),
                user=self.who(),
                timeout_s=self.timeout_s or DEFAULT_TIMEOUT_S,
                ssl_context=self.ssl_context(),
            )
        return self._client


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def _store(attribute: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or value == () or value is False:
            return  # not given here: keep what the group (or the default) says
        setattr(ctx.ensure_object(Settings), attribute, value)

    return callback


def _positive(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None and value <= 0:
        raise click.BadParameter("must be more than 0 seconds", ctx, param)
    _store("timeout_s")(ctx, param, value)


def global_options() -> list[click.Option]:
    options = [
        click.Option(
            ["-e", "--endpoint", "endpoints"],
            multiple=True,
            metavar="URL",
            help="An agent (host:port, http://host:port or https://host:port). Repeat it: cpctl tries "
            "the next when one is unreachable. Default: $CPCTL_ENDPOINT (comma-separated), "
            "else the demo's 127.0.0.1:8701-8703.",
            callback=_store("endpoints"),
        ),
        click.Option(
            ["--token-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="CPCTL_TOKEN_FILE",
            help="File holding the bearer token. Default: $CPCTL_TOKEN.",
            callback=_store("token_file"),
        ),
        click.Option(
            ["--ca-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            help="Trust this CA (PEM) for https:// endpoints (default: the system's CAs). "
            "Default: $CPCTL_CA_FILE.",
            callback=_store("ca_file"),
        ),
        click.Option(
            ["--cert-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            help="Client certificate (PEM), for agents that require one (mutual TLS). "
            "Default: $CPCTL_CERT_FILE.",
            callback=_store("cert_file"),
        ),
        click.Option(
            ["--key-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            help="The key of --cert-file (PEM, no passphrase). Default: $CPCTL_KEY_FILE.",
            callback=_store("key_file"),
        ),
        click.Option(
            ["--as", "user"],
            metavar="NAME",
            help=(
                "Your name, noted in the agent's audit log beside the token's name "
                "(the history records the token's name). Default: $USER@hostname."
            ),
            callback=_store("user"),
        ),
        click.Option(
            ["-o", "--output"],
            type=click.Choice(["table", "json"]),
            help="table (for people; the default) or json (for scripts).",
            callback=_store("output"),
        ),
        click.Option(
            ["--timeout", "timeout_s"],
            type=float,
            metavar="SECONDS",
            help=f"Seconds to wait for an agent before trying the next [default: {DEFAULT_TIMEOUT_S:g}].",
            callback=_positive,
        ),
        click.Option(
            ["--debug"],
            is_flag=True,
            help="Show the traceback of an unexpected error.",
            callback=_store("debug"),
        ),
    ]
    for option in options:
        option.expose_value = False
        setattr(option, "cpctl_global", True)  # noqa: B010 - an attribute click does not declare
    return options


def _is_global(param: click.Parameter) -> bool:
    return bool(getattr(param, "cpctl_global", False))


def _format_options(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """The command's own options, then the global ones in a section of their own."""
    own: list[tuple[str, str]] = []
    common: list[tuple[str, str]] = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue  # arguments are named in the usage line and explained in the text
        record = param.get_help_record(ctx)
        if record is not None:
            (common if _is_global(param) else own).append(record)
    if own:
        with formatter.section("Options"):
            formatter.write_dl(own)
    if common:
        with formatter.section("Global options (before or after the command)"):
            formatter.write_dl(common)


class CpctlCommand(click.Command):
    """A command whose help lists its own options first, then the global ones."""

    section = "Look"

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_options(self, ctx, formatter)


class CpctlGroup(click.Group):
    """Lists its commands in the order they were added, in sections (look, then act)."""

    section = "Look"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # click would turn it into a silent exit 1; the reader leaving is not a failure.
            raise OutputClosed("stdout closed by its reader") from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if ctx.parent is None:
            super().format_options(ctx, formatter)
            return
        _format_options(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        width = formatter.width - 6 - max((len(n) for n in self.list_commands(ctx)), default=0)
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            section = getattr(command, "section", "Commands")
            sections.setdefault(section, []).append((name, command.get_short_help_str(max(width, 30))))
        titles = {"Look": "Commands that only read", "Act": "Commands that change something (plan, then ask)"}
        for section, rows in sections.items():
            with formatter.section(titles.get(section, section)):
                formatter.write_dl(rows)


def command(group: click.Group, name: str, section: str = "Look", **kwargs: Any) -> Callable[[F], F]:
    """Register `f` as `cpctl <name>` with the global options; `section` places it in the help."""

    def decorator(f: F) -> F:
        cmd = group.command(name, cls=CpctlCommand, **kwargs)(f)
        cmd.params.extend(global_options())
        if isinstance(cmd, CpctlCommand):
            cmd.section = section
        return f

    return decorator


def subgroup(group: click.Group, name: str, section: str, help_text: str) -> CpctlGroup:
    """A group of commands under `cpctl <name>` (such as `feature disable`)."""
    sub = CpctlGroup(name, params=global_options(), help=help_text)
    sub.section = section
    group.add_command(sub)
    return sub
