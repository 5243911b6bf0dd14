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
import time
from pathlib import Path

from aiohttp import web

from controlplane.agent.loops import decide_loop, publish, watch_loop
from controlplane.agent.node import Node, Tokens
from controlplane.api.app import create_app
from controlplane.config import Settings
from controlplane.consensus.factory import make_store
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
    """The bearer tokens, and the cluster secret checked too: every missing one at once."""
    auth = settings.model.auth
    problems = []
    values: dict[str, str | None] = {"admin_token": None, "read_token": None}
    refs = [("admin_token", auth.admin_token), ("read_token", auth.read_token)]
    if settings.model.backend.kind == "raft":
        refs.append(("cluster.secret", settings.cluster.secret))
    for name, ref in refs:
        if ref is None:
            continue
        try:
            values[name] = ref.resolve(name if "." in name else f"auth.{name}")
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return Tokens(admin=values["admin_token"], read=values["read_token"])


async def run_agent(settings: Settings, agent_id: str, data_dir: Path) -> None:
    """Run one agent until SIGTERM/SIGINT; raises `TaskFailed` if a task dies."""
    me = settings.agent(agent_id)
    tokens = resolve_tokens(settings)
    tracer = AllocationTracer.from_env()
    store = make_store(settings, agent_id, data_dir)
    metrics = Metrics(agent_id)
    metrics.failover_budget.set(settings.policy.failover_budget_s)
    node = Node(settings=settings, agent_id=agent_id, store=store, metrics=metrics, tokens=tokens)
    sup = Supervisor()
    sup.install_signal_handlers()
    metrics.tasks.add_loop("main", asyncio.get_running_loop())

    try:
        if tracer is not None:
            _start_tracer(tracer, sup)
        await _start(settings, node, sup, me.http)
    except BaseException:
        await sup.shutdown()
        raise
    backend = settings.model.backend
    where = (
        f"raft {me.raft}, data in {data_dir}"
        if backend.kind == "raft"
        else f"etcd {','.join(backend.etcd.endpoints) if backend.etcd else '?'}"
    )
    log.info("agent %s (%s) serving http://%s, %s", agent_id, me.region, me.http, where)
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


async def _start(settings: Settings, node: Node, sup: Supervisor, http: str) -> None:
    store, metrics, agent_id = node.store, node.metrics, node.agent_id
    store.on_task_failure = sup.fail
    await store.start()  # creates the data dir
    sup.on_stop("store", store.close)
    probes = settings.model.probes
    targets = probe_targets(settings)

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
    prober = ProberThread(
        agent_id,
        targets,
        deliver=deliver,
        refresh_s=max(0.5, settings.policy.observation_ttl_s / 3),
        on_result=on_result,
        slow_ms=settings.policy.slow_ms,
        max_concurrency=probes.max_concurrency,
        session_timeout_s=max(t.timeout_s for t in targets) + 1,
        on_task_failure=sup.fail,
    )
    await prober.start()
    sup.on_stop("prober", prober.stop)
    if prober.loop is not None:
        metrics.tasks.add_loop("prober", prober.loop)
    sup.start("decide", decide_loop(node, tick_s=0.5))
    sup.start("watch", watch_loop(node, tick_s=1.0))
    sup.start("revision feed", node.feed.run())

    # handler_cancellation: a client that hangs up frees its blocking query at once.
    runner = web.AppRunner(create_app(node), access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    sup.on_stop("http", runner.cleanup)
    host, _, port = http.rpartition(":")
    site = web.TCPSite(runner, host, int(port), reuse_address=True, backlog=1024)
    await site.start()
