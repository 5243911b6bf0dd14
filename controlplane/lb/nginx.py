"""`controlplane lb nginx`: render the decision into nginx's configuration, safely.

The template is the operator's nginx configuration file with one placeholder line per
service where its `upstream` block goes::

    http {
        # controlplane:upstream order
        server { listen 80; location / { proxy_pass http://order; } }
    }

Each placeholder line is replaced by `render.nginx_upstream` for that service, at the
placeholder's indentation. The template is read again for every render and watched for
changes, so an edit takes effect without restarting the adapter.

A render reaches nginx only through these steps, and stops at the first that fails:

1. render every upstream (a service the decision would leave with no serving region
   keeps its previously rendered block; with none yet, nothing is written);
2. write the output atomically (temporary file in the same directory, then rename);
3. run the test command (`nginx -t ...`); if it fails, put the previous output back
   (or remove the new one when there was none), do not reload, and report the error in
   the log and the status file: nginx keeps running on its current configuration;
4. run the reload command (`nginx -s reload ...`); a failed reload is retried.

Nothing is written or reloaded when the rendered text equals what nginx last loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

from controlplane.client.follower import DecisionFollower, pause
from controlplane.errors import ConfigError, NotFound, RenderError
from controlplane.formats import NoServingRegion, nginx_upstream
from controlplane.lb.mapfile import NginxUpstream, load_nginx_map
from controlplane.lb.report import DEFAULT_HEARTBEAT_S, follow_and_report, reporter_for
from controlplane.lb.status import StatusFile, write_atomic
from controlplane.model import Decision

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)# controlplane:upstream[ \t]+(?P<service>\S+)[ \t]*$", re.M)
COMMAND_TIMEOUT_S = 30.0
_OUTPUT_TAIL = 2000


@dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool
    output: str

    def describe(self) -> str:
        text = self.output.strip()
        return text[-_OUTPUT_TAIL:] if text else "(no output)"


async def run_command(argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
    """Run `argv` (no shell); ok when it exits 0 within `timeout_s`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as e:
        return CommandResult(False, f"cannot run {argv[0]}: {e.strerror or e}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return CommandResult(False, f"{shlex.join(argv)}: no result within {timeout_s:g} s (killed)")
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        return CommandResult(False, f"{shlex.join(argv)} exited with {proc.returncode}: {text}")
    return CommandResult(True, text)


def placeholders(template: str) -> list[str]:
    """The services named by the template's placeholder lines, in order."""
    return [m.group("service") for m in PLACEHOLDER.finditer(template)]


def render_template(template: str, blocks: Mapping[str, str]) -> str:
    """The template with each placeholder replaced by its service's block, indented."""
    seen: set[str] = set()
    problems = []
    for service in placeholders(template):
        if service in seen:
            problems.append(f"placeholder for {service} appears more than once")
        seen.add(service)
        if service not in blocks:
            problems.append(f"placeholder for {service}: service not in the map file")
    if problems:
        raise RenderError("; ".join(problems))

    def replace(m: re.Match[str]) -> str:
        indent = m.group("indent")
        lines = blocks[m.group("service")].rstrip("\n").split("\n")
        return "\n".join(indent + line if line else line for line in lines)

    return PLACEHOLDER.sub(replace, template)


class NginxAdapter:
    """Renders the decision into `output` and reloads nginx when it changed and passed."""

    def __init__(
        self,
        template: Path,
        output: Path,
        upstreams: Mapping[str, NginxUpstream],
        reload_cmd: Sequence[str],
        test_cmd: Sequence[str] | None = None,
        status: StatusFile | None = None,
    ) -> None:
        self.template = template
        self.output = output
        self.upstreams = dict(upstreams)
        self.reload_cmd = list(reload_cmd)
        self.test_cmd = list(test_cmd) if test_cmd else None
        self.status = status or StatusFile(None, "nginx")
        self.decision: Decision | None = None
        self.applied_revision = 0
        self.applied_epoch: str | None = None  # of `applied_revision`; None when it carries none
        self.loaded_text: str | None = None  # what nginx last reloaded successfully
        self.reload_pending = False
        self._blocks: dict[str, str] = {}  # last good block per service
        self._template_stamp: tuple[float, int] | None = None
        self._lock = asyncio.Lock()

    def check_template(self) -> None:
        """Startup check: `ConfigError` when the template cannot be used at all."""
        try:
            text = self.template.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"--template {self.template}: cannot read ({e.strerror})"]) from e
        names = placeholders(text)
        problems = [
            f"--template: placeholder for {s}: not in the map file" for s in names if s not in self.upstreams
        ]
        if not names:
            problems.append(f"--template {self.template}: no '# controlplane:upstream SERVICE' line")
        if problems:
            raise ConfigError(problems)
        for service in self.upstreams:
            if service not in names:
                log.warning("service %s is mapped but the template has no placeholder for it", service)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = self.template.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def render(self, decision: Decision) -> tuple[str, dict[str, str], list[str]]:
        """The output text, the blocks in it, and the services held on their previous block."""
        held = []
        blocks = {}
        for service, up in self.upstreams.items():
            try:
                block = nginx_upstream(
                    decision, service, up.addresses, name=up.upstream, server_params=up.server_params
                )
            except (NoServingRegion, NotFound) as e:
                previous = self._blocks.get(service)
                if previous is None:
                    raise RenderError(f"{service}: {e.detail}; no previous upstream to keep") from e
                log.warning(
                    "revision %d: %s: %s; keeping its previous upstream", decision.revision, service, e.detail
                )
                held.append(service)
                block = previous
            blocks[service] = block
        try:
            template = self.template.read_text(encoding="utf-8")
        except OSError as e:
            raise RenderError(f"cannot read the template {self.template}: {e.strerror}") from e
        return render_template(template, blocks), blocks, held

    async def apply(self, decision: Decision) -> None:
        """Follower callback: render, write, test, reload (or restore). Never raises."""
        async with self._lock:
            self.decision = decision
            self._template_stamp = self._stamp()
            await self._apply(decision)

    async def _apply(self, decision: Decision) -> None:
        revision = decision.revision
        try:
            text, blocks, held = self.render(decision)
        except RenderError as e:
            self._fail(revision, f"cannot render revision {revision}: {e}")
            return
        if text == self.loaded_text and not self.reload_pending:
            self._blocks.update(blocks)
            self._applied(decision)
            if self.status.data.get("ok") is False:
                log.info("revision %d: nginx already runs this configuration; nothing to change", revision)
            self.status.update(ok=True, revision=revision, held=held, error=None, **self._applied_fields())
            return
        try:
            previous: bytes | None = self.output.read_bytes()
        except FileNotFoundError:
            previous = None
        except OSError as e:
            self._fail(revision, f"cannot read {self.output}: {e.strerror}")
            return
        if previous != text.encode():
            try:
                write_atomic(self.output, text.encode())
            except OSError as e:
                self._fail(revision, f"cannot write {self.output}: {e.strerror}")
                return
            if self.test_cmd:
                result = await run_command(self.test_cmd)
                if not result.ok:
                    self._restore(previous)
                    self._fail(
                        revision,
                        f"config test failed for revision {revision}; kept the previous {self.output}, "
                        f"nginx not reloaded: {result.describe()}",
                    )
                    return
        result = await run_command(self.reload_cmd)
        if not result.ok:
            self.reload_pending = True
            self._fail(revision, f"reload failed for revision {revision} (will retry): {result.describe()}")
            return
        self.reload_pending = False
        self.loaded_text = text
        self._blocks.update(blocks)
        self._applied(decision)
        log.info("revision %d: %s written and nginx reloaded", revision, self.output)
        self.status.update(ok=True, revision=revision, held=held, error=None, **self._applied_fields())

    def _applied(self, decision: Decision) -> None:
        self.applied_revision = decision.revision
        self.applied_epoch = decision.epoch or None

    def _applied_fields(self) -> dict[str, int | str | None]:
        return {"applied_revision": self.applied_revision, "applied_epoch": self.applied_epoch}

    def _restore(self, previous: bytes | None) -> None:
        try:
            if previous is None:
                self.output.unlink(missing_ok=True)
            else:
                write_atomic(self.output, previous)
        except OSError as e:
            log.critical("cannot restore the previous %s: %s", self.output, e)

    def _fail(self, revision: int, error: str) -> None:
        log.error("%s", error)
        self.status.update(ok=False, revision=revision, error=error, **self._applied_fields())

    async def refresh(self) -> None:
        """Render again when the template changed or a reload is still owed."""
        if self.decision is None:
            return
        stamp = self._stamp()
        if stamp == self._template_stamp and not self.reload_pending:
            return
        async with self._lock:
            if stamp != self._template_stamp:
                log.info(
                    "template %s changed; rendering revision %d again", self.template, self.decision.revision
                )
            self._template_stamp = stamp
            await self._apply(self.decision)

    async def run_watcher(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await pause(stop, interval_s)
            if not stop.is_set():
                await self.refresh()


def split_command(text: str) -> list[str]:
    argv = shlex.split(text)
    if not argv:
        raise ConfigError([f"command: empty (got {text!r})"])
    return argv


async def run_nginx(
    agents: list[str],
    template: Path,
    output: Path,
    map_path: Path,
    reload_cmd: str,
    test_cmd: str | None = None,
    services: tuple[str, ...] = (),
    *,
    check_s: float = 2.0,
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
    file or template propagates before anything starts.
    """
    upstreams = load_nginx_map(map_path, services)
    if not output.parent.is_dir():
        raise ConfigError([f"--output {output}: directory {output.parent} does not exist"])
    status = StatusFile(status_path, "nginx")
    status.update(services=sorted(upstreams), agents=agents, output=str(output), pid=os.getpid())
    adapter = NginxAdapter(
        template,
        output,
        upstreams,
        split_command(reload_cmd),
        split_command(test_cmd) if test_cmd else None,
        status,
    )
    adapter.check_template()
    reporter = reporter_for(status, agents, name=report_name, heartbeat_s=report_s, token=token, ssl=ssl)
    follower = DecisionFollower(agents, adapter.apply, wait_s=wait_s, token=token, ssl=ssl)
    log.info(
        "following %s for %s; rendering %s into %s", ", ".join(agents), ", ".join(upstreams), template, output
    )
    stop = stop or asyncio.Event()
    return await follow_and_report(
        follower,
        status,
        reporter,
        stop,
        once=once,
        once_timeout_s=once_timeout_s,
        helpers={"nginx template watch": lambda: adapter.run_watcher(check_s, stop)},
    )
