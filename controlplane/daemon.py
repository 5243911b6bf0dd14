"""`controlplane agent`: one agent process, from configuration to clean shutdown.

Start-up order: resolve secrets (refuse to start without a cluster secret: the Raft
transport pickles, so an unauthenticated port would run anyone's code), open the store,
start probing, publishing and deciding, and only then serve HTTP. Shutdown runs the
same steps backwards. Any task that dies takes the process down with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

from controlplane.access import Scope, Token, Tokens
from controlplane.agent.loops import decide_loop, publish, watch_loop
from controlplane.agent.node import Node
from controlplane.api.app import create_app
from controlplane.api.server import ConnectionLimits, GuardedSite, connection_limits
from controlplane.api.tls import server_context
from controlplane.config import SecretRef, Settings, load_settings
from controlplane.consensus.factory import make_store, store_problems
from controlplane.diagnostics import AllocationTracer
from controlplane.errors import ConfigError
from controlplane.metrics import Metrics
from controlplane.model import Observation
from controlplane.probes import ProbeResult, ProbeTarget, probe_targets
from controlplane.probes.isolated import ProberThread
from controlplane.tasks import Supervisor

log = logging.getLogger(__name__)


def resolve_agent_id(settings: Settings, agent_id: str | None) -> str:
    agent_id = agent_id or os.environ.get("CONTROLPLANE_AGENT_ID")
    if agent_id:
        return settings.agent(agent_id).id
    agents = settings.cluster.agents
    if len(agents) == 1:
        return agents[0].id
    known = ", ".join(a.id for a in agents)
    raise ConfigError([f"agent id: not given; pass --id or set CONTROLPLANE_AGENT_ID (one of {known})"])


def resolve_tokens(settings: Settings) -> Tokens:
    """The bearer tokens, and the cluster secret checked too: every problem at once.

    Each secret must be strong (`config.weakness`), and no two tokens may share a
    secret (the token presented would not say who is calling).
    """
    auth = settings.model.auth
    problems: list[str] = []

    def resolve(ref: SecretRef, path: str) -> str | None:
        try:
            return ref.resolve(path)
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    if settings.model.backend.kind == "raft":
        resolve(settings.cluster.secret, "cluster.secret")
    admin = resolve(auth.admin_token, "auth.admin_token") if auth.admin_token is not None else None
    read = resolve(auth.read_token, "auth.read_token") if auth.read_token is not None else None
    named: list[Token] = []
    seen: dict[str, str] = {}
    if admin is not None:
        seen[admin] = "auth.admin_token"
    if read is not None:
        seen.setdefault(read, "auth.read_token")
        if seen[read] != "auth.read_token":
            problems.append("auth.read_token: same secret as auth.admin_token (each token needs its own)")
    for i, entry in enumerate(auth.tokens):
        path = f"auth.tokens[{i}]"
        secret = resolve(entry.secret, f"{path}.secret")
        if secret is None:
            continue
        if secret in seen:
            problems.append(f"{path}.secret: same secret as {seen[secret]} (each token needs its own)")
            continue
        seen[secret] = path
        named.append(Token(entry.name, Scope(entry.scope), secret))
    if problems:
        raise ConfigError(problems)
    return Tokens(admin=admin, read=read, named=tuple(named), open_reads=auth.open_reads)


def preflight(
    settings: Settings, *, secrets: bool = True
) -> tuple[Tokens, ConnectionLimits, ssl.SSLContext | None]:
    """Every check between a valid file and a running agent, all problems at once.

    The one validation `check-config` and `agent` share (after `load_settings`): the
    backend's own rules, the secrets (unless `secrets` is False: then no tokens), the
    connection limits against this process's open-file limit, and the API's TLS files
    (`api.tls`: readable, a certificate and its key; the context, None without TLS).
    """
    problems = list(store_problems(settings))
    tokens = Tokens()
    limits: ConnectionLimits | None = None
    context: ssl.SSLContext | None = None
    if secrets:
        try:
            tokens = resolve_tokens(settings)
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        limits = connection_limits(settings)
    except ConfigError as e:
        problems.extend(e.problems)
    if settings.model.api.tls is not None:
        try:
            context = server_context(settings.model.api.tls)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems or limits is None:
        raise ConfigError(problems)
    return tokens, limits, context


async def watch_parent(sup: Supervisor, parent_pid: int, period_s: float = 0.5) -> None:
    """Stop the agent once the process that started it is gone (no orphans holding ports).

    An orphan is re-parented (to init or a subreaper), so its parent pid changes.
    """
    while os.getppid() == parent_pid:  # noqa: ASYNC110 (no event tells of a parent's death)
        await asyncio.sleep(period_s)
    log.warning("parent process %d is gone", parent_pid)
    sup.request_stop(f"parent process {parent_pid} is gone")


# What SIGHUP may change in a running agent; every other section needs a restart.
LIVE_SECTIONS = ("policy", "features", "auth", "log_level", "probes", "regions")

Hook = Callable[[Settings], Awaitable[None]]


def _shape(settings: Settings) -> dict[str, list[str]]:
    """Regions and the services each runs: what a live reload may not change."""
    return {r: sorted(rc.services) for r, rc in settings.regions.items()}


async def reload_settings(node: Node, config_path: Path, hooks: Sequence[Hook] = ()) -> str:
    """Apply `config_path` to a running agent if only live sections changed; says what it did.

    A file with any problem, with a change to a section outside `LIVE_SECTIONS` (agents,
    addresses, backend, API limits), or that adds or removes a region or a region's
    service, changes nothing. Probe targets and timings, capacities, weights and the
    policy change live: `hooks` hand the new settings to the parts that keep their own
    copy (the prober's thread is replaced when its targets change).
    """
    old = node.settings
    try:
        new = load_settings(config_path)
        if node.agent_id not in {a.id for a in new.cluster.agents}:
            raise ConfigError([f"cluster.agents: no longer lists this agent {node.agent_id}"])
        tokens = resolve_tokens(new)
    except ConfigError as e:
        problems = "; ".join(e.problems)
        log.error("reload refused, nothing changed: %s: %s", config_path, problems)
        return f"refused: {problems}"
    fixed = [
        name
        for name in type(new.model).model_fields
        if name not in LIVE_SECTIONS and getattr(new.model, name) != getattr(old.model, name)
    ]
    if _shape(new) != _shape(old):
        fixed.append("regions (a region or a service added or removed)")
    if fixed:
        log.error(
            "reload refused, nothing changed: %s changed, which needs a restart (live: %s)",
            ", ".join(fixed),
            ", ".join(LIVE_SECTIONS),
        )
        return f"refused: {', '.join(fixed)} need a restart"
    changed = [name for name in LIVE_SECTIONS if getattr(new.model, name) != getattr(old.model, name)]
    node.settings = new
    node.tokens = tokens
    logging.getLogger().setLevel(getattr(logging, new.model.log_level.upper(), logging.INFO))
    for hook in hooks:
        await hook(new)
    log.warning(
        "reloaded %s: %s (config %s)", config_path, ", ".join(changed) or "no change", new.config_hash
    )
    return f"reloaded: {', '.join(changed) or 'no change'}"


async def reload_on_sighup(node: Node, config_path: Path, hooks: Sequence[Hook] = ()) -> None:
    """Reload the configuration on every SIGHUP (instead of dying, the default)."""
    wanted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, wanted.set)
    try:
        while True:
            await wanted.wait()
            wanted.clear()
            await reload_settings(node, config_path, hooks)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def run_agent(
    settings: Settings,
    agent_id: str,
    data_dir: Path,
    *,
    parent_pid: int | None = None,
    config_path: Path | None = None,
) -> None:
    """Run one agent until SIGTERM/SIGINT (or, with `parent_pid`, until that parent is
    gone); raises `TaskFailed` if a task dies."""
    me = settings.agent(agent_id)
    tokens, limits, tls_context = preflight(settings)
    tracer = AllocationTracer.from_env()
    store = make_store(settings, agent_id, data_dir)
    metrics = Metrics(agent_id)
    metrics.failover_budget.set(settings.policy.failover_budget_s)
    node = Node(
        settings=settings,
        agent_id=agent_id,
        store=store,
        metrics=metrics,
        tokens=tokens,
        max_watchers=limits.max_watchers,
    )
    sup = Supervisor()
    sup.install_signal_handlers()
    metrics.tasks.add_loop("main", asyncio.get_running_loop())
    if parent_pid is not None:
        sup.start("parent watch", watch_parent(sup, parent_pid))
    reload_hooks: list[Hook] = []
    if config_path is not None:
        sup.start("reload on SIGHUP", reload_on_sighup(node, config_path, reload_hooks))

    try:
        if tracer is not None:
            _start_tracer(tracer, sup)
        await _start(settings, node, sup, me.http, limits, reload_hooks, tls_context)
    except BaseException:
        await sup.shutdown()
        raise
    backend = settings.model.backend
    where = (
        f"raft {me.raft}, data in {data_dir}"
        if backend.kind == "raft"
        else f"etcd {','.join(backend.etcd.endpoints) if backend.etcd else '?'}"
    )
    mutual = " (mutual TLS)" if settings.model.api.tls and settings.model.api.tls.client_ca_file else ""
    log.info("agent %s (%s) serving %s%s, %s", agent_id, me.region, settings.agent_url(me), mutual, where)
    log.info(
        "http limits: %d connections, %d watchers (open-file limit %d), request head within %g s",
        limits.max_connections,
        limits.max_watchers,
        limits.nofile,
        settings.model.api.header_timeout_s,
    )
    await sup.wait()


def _start_tracer(tracer: AllocationTracer, sup: Supervisor) -> None:
    """tracemalloc from the environment; SIGUSR2 logs the top allocation differences."""
    loop = asyncio.get_running_loop()
    tracer.start()
    loop.add_signal_handler(signal.SIGUSR2, tracer.request)

    async def stop_tracer() -> None:
        loop.remove_signal_handler(signal.SIGUSR2)
        tracer.stop()

    sup.on_stop("tracemalloc", stop_tracer)
    sup.start("allocation dumps", tracer.run())


async def _start(
    settings: Settings,
    node: Node,
    sup: Supervisor,
    http: str,
    limits: ConnectionLimits,
    reload_hooks: list[Hook],
    tls_context: ssl.SSLContext | None,
) -> None:
    store, metrics, agent_id = node.store, node.metrics, node.agent_id
    store.on_task_failure = sup.fail
    await store.start()  # creates the data dir
    sup.on_stop("store", store.close)
    probes = settings.model.probes

    # Detection stage of a failover: from the first failed probe of a (region, service)
    # to the observation that says it is down. One entry per pair at most; written on the
    # prober's thread, read on this one (single dict operations, atomic under the GIL).
    failing_since: dict[tuple[str, str], float] = {}

    async def deliver(observations: list[Observation]) -> None:
        for o in observations:
            started = failing_since.get((o.region, o.service))
            if not o.up and o.inconclusive is None and started is not None:
                metrics.observe_stages({"detection": o.at - started})
        await publish(node, observations)

    def on_result(target: ProbeTarget, result: ProbeResult) -> None:
        metrics.observe_probe(
            target.region, target.service, result.ok, result.duration_s, result.inconclusive
        )
        if result.ok:
            failing_since.pop(target.key, None)
        elif not result.inconclusive:
            failing_since.setdefault(target.key, time.time() - result.duration_s)

    # The prober and its refresh run on a thread and event loop of their own: however
    # busy the API keeps this loop, probes keep their timing (issue 15).
    def new_prober(s: Settings) -> ProberThread:
        targets = probe_targets(s)
        return ProberThread(
            agent_id,
            targets,
            deliver=deliver,
            refresh_s=max(0.5, s.policy.observation_ttl_s / 3),
            on_result=on_result,
            slow_ms=s.policy.slow_ms,
            max_concurrency=s.model.probes.max_concurrency,
            session_timeout_s=max(t.timeout_s for t in targets) + 1,
            on_task_failure=sup.fail,
        )

    running = [new_prober(settings)]
    await running[0].start()

    async def stop_prober() -> None:
        await running[0].stop()

    async def reload_probes(new: Settings) -> None:
        """New targets or timings: a new prober, then the old one stopped (its last
        observations stay fresh meanwhile); otherwise only the slow threshold."""
        old = running[0]
        if probe_targets(new) == list(old.targets) and new.model.probes == node_probes[0]:
            old.set_slow_ms(new.policy.slow_ms)
            return
        fresh = new_prober(new)
        await fresh.start()
        running[0], node_probes[0] = fresh, new.model.probes
        if fresh.loop is not None:
            metrics.tasks.add_loop("prober", fresh.loop)
        await old.stop()
        log.warning("probes reloaded: %d targets (were %d)", len(fresh.targets), len(old.targets))

    node_probes = [probes]
    sup.on_stop("prober", stop_prober)
    reload_hooks.append(reload_probes)
    if running[0].loop is not None:
        metrics.tasks.add_loop("prober", running[0].loop)
    sup.start("decide", decide_loop(node, tick_s=0.5))
    sup.start("watch", watch_loop(node, tick_s=1.0))
    sup.start("revision feed", node.feed.run())

    # handler_cancellation: a client that hangs up frees its blocking query at once.
    # keepalive_timeout: aiohttp closes a connection whose request head is not complete
    # this long after it opened or after its last answer (slowloris, idle sockets).
    runner = web.AppRunner(
        create_app(node),
        access_log=None,
        shutdown_timeout=2.0,
        handler_cancellation=True,
        keepalive_timeout=settings.model.api.header_timeout_s,
        # After an early answer (a body too slow, too big), read what is left of it this
        # long at most before closing (aiohttp's default is 10 s).
        lingering_time=1.0,
    )
    await runner.setup()
    sup.on_stop("http", runner.cleanup)
    host, _, port = http.rpartition(":")
    site = GuardedSite(
        runner,
        host,
        int(port),
        max_connections=limits.max_connections,
        ssl_context=tls_context,
        # A TLS handshake must finish as soon as a request head must arrive (slowloris).
        handshake_timeout_s=settings.model.api.header_timeout_s,
    )
    await site.start()
