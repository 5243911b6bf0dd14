"""`controlplane lb haproxy`: keep HAProxy's server weights on the committed decision.

The adapter follows the decision (`controlplane.client.DecisionFollower`) and turns it into the
desired setting of every mapped HAProxy server (`render.haproxy_plan`). It never sends
the whole plan blindly: it reads what HAProxy has now (`show servers state`) and sends
only the commands that differ, in the plan's order (servers that will serve first).
The same reconciliation runs every `reconcile_s` seconds, so what an HAProxy restart or
reload reset (weights and states come back from its configuration file), or what an
operator changed by hand, is put back within one period; a socket that comes back after
being unreachable is logged as a reconnection and reconciled at once.

Safety: a decision that would leave no mapped server of a backend serving is not
applied to that backend; the backend keeps the previous desired state, and the status
says so. When no agent answers, the last applied state stays (static stability).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

from controlplane.client.follower import DecisionFollower, pause
from controlplane.errors import NotFound, RuntimeApiError
from controlplane.formats import HaproxyPlan, ServerMap, ServerSetting, haproxy_plan
from controlplane.lb.mapfile import load_haproxy_map
from controlplane.lb.report import DEFAULT_HEARTBEAT_S, follow_and_report, reporter_for
from controlplane.lb.status import StatusFile
from controlplane.model import Decision

log = logging.getLogger(__name__)

# srv_admin_state bits (HAProxy's SRV_ADMF_*): forced maintenance and forced drain are
# what the runtime API's `state maint` / `state drain` set and `state ready` clears.
ADMIN_FORCED_MAINT = 0x01
ADMIN_FORCED_DRAIN = 0x08


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server as `show servers state` reports it."""

    backend: str
    server: str
    weight: int
    admin_state: int
    op_state: int

    @property
    def maint(self) -> bool:
        return bool(self.admin_state & ADMIN_FORCED_MAINT)

    @property
    def drain(self) -> bool:
        return bool(self.admin_state & ADMIN_FORCED_DRAIN)


def parse_servers_state(text: str) -> dict[tuple[str, str], ServerState]:
    """Parse `show servers state` (format version 1), by its header's column names."""
    columns: list[str] = []
    out: dict[tuple[str, str], ServerState] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            columns = line.lstrip("# ").split()
            continue
        fields = line.split()
        if not columns or len(fields) < len(columns):
            continue
        row = dict(zip(columns, fields, strict=False))
        try:
            state = ServerState(
                backend=row["be_name"],
                server=row["srv_name"],
                weight=int(row["srv_uweight"]),
                admin_state=int(row["srv_admin_state"]),
                op_state=int(row["srv_op_state"]),
            )
        except (KeyError, ValueError):
            continue
        out[(state.backend, state.server)] = state
    return out


def commands_for_drift(setting: ServerSetting, now: ServerState) -> tuple[str, ...]:
    """The subset of `setting.commands()` that changes something, in the same order."""
    wanted = []
    for command in setting.commands():
        if command.endswith(" state ready"):
            if now.maint or now.drain:
                wanted.append(command)
        elif command.endswith(" state maint"):
            if not now.maint:
                wanted.append(command)
        elif now.weight != setting.weight:
            wanted.append(command)
    return tuple(wanted)


def _describe(setting: ServerSetting) -> str:
    return f"weight {setting.weight} {'ready' if setting.ready else 'maint'}"


def _describe_live(state: ServerState) -> str:
    return f"weight {state.weight} {'maint' if state.maint else 'drain' if state.drain else 'ready'}"


class RuntimeApi:
    """HAProxy's runtime API on a unix socket (`stats socket PATH level admin`).

    One connection per command, as HAProxy's non-interactive mode expects; every
    connection, write and read has a timeout.
    """

    def __init__(self, socket_path: str | Path, timeout_s: float = 3.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s

    async def command(self, command: str) -> str:
        """Send one command; its answer (empty for a successful `set server`)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    data = await reader.read(-1)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError as e:
            raise RuntimeApiError(f"{self.socket_path}: no answer within {self.timeout_s:g} s") from e
        except OSError as e:
            raise RuntimeApiError(f"{self.socket_path}: {e.strerror or e}") from e
        return data.decode(errors="replace")

    async def servers_state(self) -> dict[tuple[str, str], ServerState]:
        return parse_servers_state(await self.command("show servers state"))


class HaproxyAdapter:
    """Desired server settings per service, reconciled with HAProxy."""

    def __init__(
        self, api: RuntimeApi, services: Mapping[str, ServerMap], status: StatusFile | None = None
    ) -> None:
        self.api = api
        self.services = dict(services)
        self.status = status or StatusFile(None, "haproxy")
        self.desired: dict[str, HaproxyPlan] = {}
        self.revision = 0
        self.epoch: str | None = None  # of `revision`; None when the decision carries none
        self.connected: bool | None = None  # None: not tried yet
        self.commands_sent = 0
        self.drift_repairs = 0
        self._in_force: dict[str, ServerSetting] = {}  # by backend/server: what HAProxy was given
        self._lock = asyncio.Lock()
        self._problems: dict[str, str] = {}  # what is wrong now, by subject; logged on change

    # -- the decision ------------------------------------------------------------------

    async def apply(self, decision: Decision) -> None:
        """Follower callback: take the decision's settings as desired, then reconcile."""
        held: list[str] = []
        for service, servers in self.services.items():
            try:
                plan = haproxy_plan(decision, service, servers)
            except NotFound as e:
                log.error("revision %d: %s; %s kept as it is", decision.revision, e.detail, service)
                held.append(service)
                continue
            for note in plan.notes:
                log.warning("revision %d: %s", decision.revision, note)
            held.extend(plan.held)
            self.desired[service] = self._merge_held(plan)
            weights = ", ".join(f"{s.name}={s.weight}{'' if s.ready else ' maint'}" for s in plan.settings)
            log.info("revision %d: %s -> %s", decision.revision, service, weights or "(held)")
        self.revision = decision.revision
        self.epoch = decision.epoch or None
        self.status.update(revision=decision.revision, held=held)
        await self.reconcile()

    def _merge_held(self, plan: HaproxyPlan) -> HaproxyPlan:
        """The plan, with the previous settings of backends it holds as they were."""
        previous = self.desired.get(plan.service)
        kept = [s for s in previous.settings if s.backend in plan.held] if previous else []
        settings = list(plan.settings) + kept
        settings.sort(key=lambda s: not s.serving)  # stable: serving servers first
        return HaproxyPlan(plan.service, plan.revision, tuple(settings), plan.held, plan.notes)

    # -- reconciliation ----------------------------------------------------------------

    async def reconcile(self) -> int:
        """Read HAProxy's servers and send what differs from the desired settings.

        Returns the number of commands sent. Never raises for HAProxy being away: the
        status and the log say so, and the next period tries again. A server that no
        longer has what was last applied to it (HAProxy restarted or reloaded, or an
        operator changed it) is logged as drift and counted in the status.
        """
        async with self._lock:
            try:
                sent, errors = await self._reconcile()
            except RuntimeApiError as e:
                if self.connected is not False:
                    log.error(
                        "HAProxy runtime API unreachable: %s; keeping desired revision %d", e, self.revision
                    )
                self.connected = False
                self.status.update(ok=False, connected=False, errors=[str(e)])
                return 0
            applied = {"applied_revision": self.revision, "applied_epoch": self.epoch} if not errors else {}
            self.status.update(
                ok=not errors,
                connected=True,
                errors=errors,
                **applied,
                commands_sent_total=self.commands_sent,
                drift_repairs_total=self.drift_repairs,
                reconciled_at=time.time(),
            )
            return sent

    async def _reconcile(self) -> tuple[int, list[str]]:
        live = await self.api.servers_state()
        if self.connected is False:
            log.warning("HAProxy runtime API reachable again; reconciling revision %d", self.revision)
        self.connected = True
        problems: dict[str, str] = {}
        drifted = []
        sent = 0
        for plan in list(self.desired.values()):  # apply() may add a service meanwhile
            for setting in plan.settings:
                now = live.get((setting.backend, setting.server))
                if now is None:
                    problems[setting.name] = f"{setting.name} ({setting.region}): no such server in HAProxy"
                    continue
                before = self._in_force.get(setting.name)
                if before is not None and commands_for_drift(before, now):
                    drifted.append(f"{setting.name} is {_describe_live(now)}, was set {_describe(before)}")
                ok = True
                for command in commands_for_drift(setting, now):
                    answer = (await self.api.command(command)).strip()
                    sent += 1
                    self.commands_sent += 1
                    if answer:
                        problems[command] = f"{command}: {answer}"
                        ok = False
                    else:
                        log.info("applied: %s", command)
                if ok:
                    self._in_force[setting.name] = setting
        if drifted:
            self.drift_repairs += 1
            log.warning(
                "HAProxy no longer has what was applied (restart, reload or a manual change): %s; "
                "re-applying revision %d",
                "; ".join(drifted),
                self.revision,
            )
        self._report(problems)
        return sent, sorted(problems.values())

    def _report(self, problems: dict[str, str]) -> None:
        for key, text in problems.items():
            if self._problems.get(key) != text:
                log.error("HAProxy: %s", text)
        for key in self._problems.keys() - problems.keys():
            log.info("HAProxy: resolved: %s", self._problems[key])
        self._problems = problems

    async def run_reconciler(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await pause(stop, interval_s)
            if not stop.is_set() and self.desired:
                await self.reconcile()


async def run_haproxy(
    agents: list[str],
    socket_path: Path,
    map_path: Path,
    services: tuple[str, ...] = (),
    *,
    reconcile_s: float = 5.0,
    wait_s: float = 10.0,
    status_path: Path | None = None,
    token: str | None = None,
    once: bool = False,
    once_timeout_s: float = 60.0,
    stop: asyncio.Event | None = None,
    report_name: str | None = None,
    report_s: float = DEFAULT_HEARTBEAT_S,
    ssl: SSLContext | None = None,
) -> int:
    """Run the adapter until `stop` (or, with `once`, one revision); the exit code.

    It reports to every agent as `report_name` every `report_s` seconds and on every
    change (0: not at all); see `controlplane.lb.report`. `ssl`: the TLS context for
    https agents, used to follow and to report. `ConfigError` for a bad map
    file propagates before anything starts.
    """
    mapping = load_haproxy_map(map_path, services)
    status = StatusFile(status_path, "haproxy")
    status.update(services=sorted(mapping), agents=agents, socket=str(socket_path))
    reporter = reporter_for(status, agents, name=report_name, heartbeat_s=report_s, token=token, ssl=ssl)
    adapter = HaproxyAdapter(RuntimeApi(socket_path), mapping, status)
    follower = DecisionFollower(agents, adapter.apply, wait_s=wait_s, token=token, ssl=ssl)
    log.info(
        "following %s for %s; HAProxy runtime API at %s", ", ".join(agents), ", ".join(mapping), socket_path
    )
    stop = stop or asyncio.Event()
    return await follow_and_report(
        follower,
        status,
        reporter,
        stop,
        once=once,
        once_timeout_s=once_timeout_s,
        helpers={"haproxy reconcile": lambda: adapter.run_reconciler(reconcile_s, stop)},
    )
