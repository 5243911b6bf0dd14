"""The `controlplane` command: run an agent, check a config, run the demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from controlplane.errors import ConfigError

log = logging.getLogger("controlplane")


def setup_logging(level: str, agent_id: str = "", log_format: str = "text", region: str = "") -> None:
    """Log to stderr: text for a terminal, or one JSON object per line (`json`)."""
    prefix = f"{agent_id} " if agent_id else ""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(agent=agent_id, region=region))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # aiohttp's access log is off; its client logs nothing useful at INFO.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("pysyncobj").addFilter(_ResentEntriesFilter())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, agent, region, message, and the
    structured fields a record carries (`extra={"audit": {...}}` on the audit log;
    `revision` and `term` where a record has them)."""

    def __init__(self, agent: str = "", region: str = "") -> None:
        super().__init__()
        self.agent, self.region = agent, region

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "agent": self.agent or None,
            "region": self.region or None,
            "msg": record.getMessage(),
        }
        for key in ("revision", "term"):
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        audit = record.__dict__.get("audit")
        if isinstance(audit, dict):
            out.update({k: v for k, v in audit.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in out.items() if v is not None}, default=str)


class _ResentEntriesFilter(logging.Filter):
    """Demote pysyncobj's "truncating already-applied log entries" to DEBUG.

    With appendEntriesUseBatch off, a late reply makes the leader resend entries a
    follower already has; the follower replaces them with identical ones and applies
    nothing twice. pysyncobj logs that as CRITICAL, which would page someone for noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "already-applied" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def fail_config(e: ConfigError, source: str) -> None:
    click.echo(f"controlplane: {source}: {len(e.problems)} problem(s), nothing started:", err=True)
    for problem in e.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


def run(coro: object) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without
        pass
    asyncio.run(coro)  # type: ignore[arg-type]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="controlplane")
def main() -> None:
    """controlplane: multi-region HA control plane daemon."""


@main.command()
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML file."
)
@click.option(
    "--id", "agent_id", envvar="CONTROLPLANE_AGENT_ID", help="Which agent of cluster.agents this is."
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: data_dir/<id>.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line (agent, region, level, logger, msg, and audit fields).",
)
@click.option(
    "--exit-with-parent",
    is_flag=True,
    help="Stop when the process that started this agent is gone (for demos and harnesses).",
)
def agent(
    config_path: str,
    agent_id: str | None,
    data_dir: Path | None,
    log_level: str | None,
    log_format: str,
    exit_with_parent: bool,
) -> None:
    """Run one agent until SIGTERM or SIGINT."""
    from controlplane.config import load_settings
    from controlplane.daemon import resolve_agent_id, run_agent
    from controlplane.errors import TaskFailed

    try:
        settings = load_settings(config_path)
        agent_id = resolve_agent_id(settings, agent_id)
    except ConfigError as e:
        fail_config(e, config_path)
        return
    setup_logging(
        log_level or settings.model.log_level, agent_id, log_format, settings.agent(agent_id).region
    )
    data_dir = data_dir or settings.model.data_dir / agent_id
    parent = os.getppid() if exit_with_parent else None
    try:
        run(run_agent(settings, agent_id, data_dir, parent_pid=parent, config_path=Path(config_path)))
    except ConfigError as e:
        fail_config(e, config_path)
    except TaskFailed as e:
        log.critical("%s", e)
        sys.exit(1)
    except OSError as e:
        log.critical("cannot start: %s", e)
        sys.exit(1)


@main.command("check-config")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--no-secrets", is_flag=True, help="Do not resolve secrets (on a machine that does not have them)."
)
@click.option(
    "--promtool",
    "promtool",
    default="auto",
    show_default=True,
    help="Also parse every PromQL query with promtool: auto (when on PATH), off, or a path.",
)
def check_config(config_path: str, no_secrets: bool, promtool: str) -> None:
    """Validate a configuration file and its secrets, print a summary; exit 2 when wrong.

    Secrets (cluster secret, tokens) are resolved from their environment variables or
    files as the agent would resolve them, and checked (at least 16 bytes, no example
    placeholder); their values are never printed. PromQL queries are parsed by promtool
    when it is installed.
    """
    from controlplane.config import load_settings
    from controlplane.daemon import preflight
    from controlplane.probes import promtool as promtool_check

    tokens = None
    try:
        s = load_settings(config_path)
        # The agent's own checks, shared: what passes here starts (secrets aside).
        resolved, _, _ = preflight(s, secrets=not no_secrets)
        tokens = None if no_secrets else resolved
    except ConfigError as e:
        fail_config(e, config_path)
        return
    found = promtool_check.queries(s)
    if found and promtool != "off":
        binary = promtool_check.find_promtool(None if promtool == "auto" else promtool)
        if binary is None:
            click.echo(
                f"{config_path}: promtool not found (Debian package prometheus): "
                f"{len(found)} PromQL queries checked for brackets and quotes only",
                err=True,
            )
        else:
            problems = promtool_check.check_queries(found, binary)
            if problems:
                fail_config(ConfigError(problems), config_path)
                return
            click.echo(f"{config_path}: {len(found)} PromQL queries parsed by {binary}")
    tls = s.model.api.tls
    api = "http" if tls is None else "https" + (" with client certificates" if tls.client_ca_file else "")
    if tokens is None:
        secrets = "not checked"
    else:
        named = ", ".join(f"{t.name} ({t.scope})" for t in tokens.entries) or "none: writes disabled"
        reads = "open" if tokens.reads_open else "need a token"
        secrets = f"resolved and strong (tokens: {named}; reads {reads})"
    click.echo(
        f"{config_path}: ok: {len(s.cluster.agents)} agents, {len(s.policy.regions)} regions, "
        f"services {', '.join(s.policy.services)}, backend {s.model.backend.kind}, api {api}, "
        f"secrets {secrets}"
    )


@main.command()
@click.option("--serve", is_flag=True, help="Keep the deployment running for exploration.")
@click.option("--drill", is_flag=True, help="Run a drill of cn-east with cpctl and print its report.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Default: config/demo.yaml.")
@click.option("--random-ports", is_flag=True, help="Use free ports instead of the config's (for tests).")
@click.option("--backend", type=click.Choice(["raft", "etcd"]), default="raft")
@click.option("--etcd-endpoints", default="", help="Comma-separated etcd endpoints (backend etcd).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep agent logs here.")
@click.option(
    "--tls",
    is_flag=True,
    help="Agents serve HTTPS with a throwaway local CA's certificate (prints how to trust it).",
)
def demo(
    serve: bool,
    drill: bool,
    config_path: str | None,
    random_ports: bool,
    backend: str,
    etcd_endpoints: str,
    log_dir: Path | None,
    tls: bool,
) -> None:
    """Run a local multi-region deployment through an outage and a recovery."""
    from controlplane.demo import DemoOptions, run_demo

    setup_logging("warning")
    options = DemoOptions(
        serve=serve,
        drill=drill,
        config_path=Path(config_path) if config_path else None,
        random_ports=random_ports,
        backend=backend,
        etcd_endpoints=[e for e in etcd_endpoints.split(",") if e],
        log_dir=log_dir,
        tls=tls,
    )
    try:
        code = asyncio.run(run_demo(options))
    except ConfigError as e:
        fail_config(e, config_path or "demo")
        return
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@main.group()
def lb() -> None:
    """Load balancer adapters that follow the committed decision."""


def _lb_options(f: Any) -> Any:
    """Options both adapters share: where the agents are and how to report."""
    options = [
        click.option(
            "--agent",
            "agents",
            multiple=True,
            required=True,
            envvar="CONTROLPLANE_AGENTS",
            callback=_agent_urls,
            help="Agent base URL, e.g. http://10.0.0.1:8700 (https:// when the agents serve TLS); "
            "repeat, or separate by commas or spaces.",
        ),
        click.option(
            "--service", "services", multiple=True, help="Only these services (default: all mapped)."
        ),
        click.option(
            "--token",
            envvar="CONTROLPLANE_READ_TOKEN",
            help="Token for the agents: scope lb reads and reports (POST /v1/lbs); read only reads.",
        ),
        click.option(
            "--wait", "wait_s", type=float, default=10.0, show_default=True, help="Long-poll seconds."
        ),
        click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), help="JSON status."),
        click.option("--once", is_flag=True, help="Apply the current decision once; exit 1 if it failed."),
        click.option(
            "--once-timeout",
            "once_timeout_s",
            type=click.FloatRange(min=0.1, max=3600),
            default=60.0,
            show_default=True,
            help="With --once: give up (exit 1, saying why) when nothing is applied this soon.",
        ),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"),
        click.option(
            "--name",
            "report_name",
            callback=_check_lb_name,
            help="Name this load balancer reports as (1-64 of A-Za-z0-9._@-). Default: ADAPTER@HOSTNAME.",
        ),
        click.option(
            "--ca-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="CONTROLPLANE_CA_FILE",
            help="Trust this CA (PEM) for https agents (default: the system's CAs).",
        ),
        click.option(
            "--cert-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="CONTROLPLANE_CERT_FILE",
            help="Client certificate (PEM) for agents that require one (mutual TLS).",
        ),
        click.option(
            "--key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="CONTROLPLANE_KEY_FILE",
            help="The key of --cert-file (PEM, no passphrase).",
        ),
        click.option(
            "--report-s",
            "report_s",
            type=click.FloatRange(min=0, max=3600),
            default=5.0,
            show_default=True,
            help="Report to every agent this often and on every change; 0: never.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _agent_urls(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Every agent URL, from repeated options and commas or spaces alike (as cpctl takes
    them), each checked at start: a typo is a usage error, not a retry loop."""
    from controlplane.addresses import url_problem

    urls: list[str] = []
    for item in value:
        for url in item.replace(",", " ").split():
            problem = url_problem(url, ("http", "https"))
            if problem is not None:
                raise click.BadParameter(f"{url!r}: {problem}", ctx, param)
            if url.rstrip("/") not in urls:
                urls.append(url.rstrip("/"))
    if not urls:
        raise click.BadParameter("no agent URL given", ctx, param)
    return tuple(urls)


def _check_lb_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from controlplane.lbreports import valid_name

    if value is not None and not valid_name(value):
        raise click.BadParameter(f"1-64 characters of letters, digits and ._@- (got {value!r})")
    return value


def _lb_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext | None:
    """The adapters' TLS context from --ca-file/--cert-file/--key-file; None when none is given."""
    from controlplane.client.tls import TlsFilesError, client_context

    if ca_file is None and cert_file is None and key_file is None:
        return None
    try:
        return client_context(ca_file, cert_file, key_file)
    except TlsFilesError as e:
        raise click.UsageError(str(e)) from None


def _run_adapter(main_coro: Any, source: str) -> None:
    """Run an adapter until SIGTERM/SIGINT; its exit code (2 for a bad map or template)."""

    async def with_signals() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        code: int = await main_coro(stop)
        return code

    try:
        code = asyncio.run(with_signals())
    except ConfigError as e:
        fail_config(e, source)
        return
    sys.exit(code)


@lb.command("haproxy")
@_lb_options
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path), help="Runtime API.")
@click.option("--map", "map_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reconcile-interval", "reconcile_s", type=float, default=5.0, show_default=True)
def lb_haproxy(
    agents: tuple[str, ...],
    services: tuple[str, ...],
    token: str | None,
    wait_s: float,
    status_file: Path | None,
    once: bool,
    once_timeout_s: float,
    log_level: str,
    report_name: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    report_s: float,
    socket_path: Path,
    map_path: Path,
    reconcile_s: float,
) -> None:
    """Keep HAProxy's server weights and states on the decision (runtime API)."""
    from controlplane.lb.haproxy import run_haproxy

    setup_logging(log_level, "lb-haproxy")
    tls = _lb_tls(ca_file, cert_file, key_file)
    _run_adapter(
        lambda stop: run_haproxy(
            list(agents),
            socket_path,
            map_path,
            services,
            reconcile_s=reconcile_s,
            wait_s=wait_s,
            status_path=status_file,
            token=token,
            once=once,
            once_timeout_s=once_timeout_s,
            stop=stop,
            report_name=report_name,
            report_s=report_s,
            ssl=tls,
        ),
        "lb haproxy",
    )


@lb.command("nginx")
@_lb_options
@click.option("--template", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--map", "map_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--reload-cmd", required=True, help="e.g. 'nginx -s reload' (split like a shell, not run by one)."
)
@click.option(
    "--test-cmd", help="e.g. 'nginx -t'; the output is restored and nginx not reloaded if it fails."
)
@click.option("--check-interval", "check_s", type=float, default=2.0, show_default=True)
def lb_nginx(
    agents: tuple[str, ...],
    services: tuple[str, ...],
    token: str | None,
    wait_s: float,
    status_file: Path | None,
    once: bool,
    once_timeout_s: float,
    log_level: str,
    report_name: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    report_s: float,
    template: Path,
    output: Path,
    map_path: Path,
    reload_cmd: str,
    test_cmd: str | None,
    check_s: float,
) -> None:
    """Render nginx upstream blocks from the decision, test, then reload."""
    from controlplane.lb.nginx import run_nginx

    setup_logging(log_level, "lb-nginx")
    tls = _lb_tls(ca_file, cert_file, key_file)
    _run_adapter(
        lambda stop: run_nginx(
            list(agents),
            template,
            output,
            map_path,
            reload_cmd,
            test_cmd,
            services,
            check_s=check_s,
            wait_s=wait_s,
            status_path=status_file,
            token=token,
            once=once,
            once_timeout_s=once_timeout_s,
            stop=stop,
            report_name=report_name,
            report_s=report_s,
            ssl=tls,
        ),
        "lb nginx",
    )


if __name__ == "__main__":
    main()
