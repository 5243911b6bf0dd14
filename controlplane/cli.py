"""The `controlplane` command: run an agent, check a config, run the demo."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from controlplane.errors import ConfigError

log = logging.getLogger("controlplane")


def setup_logging(level: str, agent_id: str = "") -> None:
    prefix = f"{agent_id} " if agent_id else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp's access log is off; its client logs nothing useful at INFO.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("pysyncobj").addFilter(_ResentEntriesFilter())


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
def agent(config_path: str, agent_id: str | None, data_dir: Path | None, log_level: str | None) -> None:
    """Run one agent until SIGTERM or SIGINT."""
    from controlplane.agent.daemon import resolve_agent_id, run_agent
    from controlplane.agent.supervisor import TaskFailed
    from controlplane.config import load_settings

    try:
        settings = load_settings(config_path)
        agent_id = resolve_agent_id(settings, agent_id)
    except ConfigError as e:
        fail_config(e, config_path)
        return
    setup_logging(log_level or settings.model.log_level, agent_id)
    data_dir = data_dir or settings.model.data_dir / agent_id
    try:
        run(run_agent(settings, agent_id, data_dir))
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
def check_config(config_path: str) -> None:
    """Validate a configuration file and print a summary; exit 2 when it is wrong."""
    from controlplane.config import load_settings

    try:
        s = load_settings(config_path)
    except ConfigError as e:
        fail_config(e, config_path)
        return
    click.echo(
        f"{config_path}: ok: {len(s.cluster.agents)} agents, {len(s.policy.regions)} regions, "
        f"services {', '.join(s.policy.services)}, backend {s.model.backend.kind}"
    )


@main.command()
@click.option("--serve", is_flag=True, help="Keep the deployment running for exploration.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Default: config/demo.yaml.")
@click.option("--random-ports", is_flag=True, help="Use free ports instead of the config's (for tests).")
@click.option("--backend", type=click.Choice(["raft", "etcd"]), default="raft")
@click.option("--etcd-endpoints", default="", help="Comma-separated etcd endpoints (backend etcd).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep agent logs here.")
def demo(
    serve: bool,
    config_path: str | None,
    random_ports: bool,
    backend: str,
    etcd_endpoints: str,
    log_dir: Path | None,
) -> None:
    """Run a local multi-region deployment through an outage and a recovery."""
    from controlplane.demo import DemoOptions, run_demo

    setup_logging("warning")
    options = DemoOptions(
        serve=serve,
        config_path=Path(config_path) if config_path else None,
        random_ports=random_ports,
        backend=backend,
        etcd_endpoints=[e for e in etcd_endpoints.split(",") if e],
        log_dir=log_dir,
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


if __name__ == "__main__":
    main()
