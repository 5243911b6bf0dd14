"""What every benchmark here shares: statistics, the machine, processes, clusters, output.

- `percentiles`: nearest-rank p50/p95/p99/max of a sample (no interpolation, so a p99
  of 20 trials is the slowest trial, and says so by its `n`).
- `machine` and `wait_for_quiet`: the machine is 2 shared cores; every result records
  the load average it was measured under, and a final run can wait for a quieter moment.
- `ProcStats`: RSS, CPU seconds, threads and open file descriptors of a process, read
  from /proc (no psutil).
- `Processes`: peers (redis, sentinel, haproxy, nginx, wrk) started as real processes in
  their own session, stopped by PID (SIGTERM, then SIGKILL) in `finally`.
- `bench_config`: the demo deployment on free loopback ports with the probe and policy
  settings a benchmark asks for, 3 or 5 agents.

Everything a benchmark starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from controlplane.testing.localcluster import load_demo_config, remap_ports
from controlplane.testing.ports import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class MissingBinary(RuntimeError):
    """A peer the benchmark drives is not installed; the message names the Debian package."""


# -- statistics -------------------------------------------------------------------------


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 1)))
    return float(sorted_values[int(rank) - 1])


def percentiles(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """`{"n", "min", "p50", "p95", "p99", "max", "mean"}`; values None when there are none."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0, "min": None, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(xs),
        "min": round(xs[0], digits),
        "p50": round(quantile(xs, 0.50), digits),
        "p95": round(quantile(xs, 0.95), digits),
        "p99": round(quantile(xs, 0.99), digits),
        "max": round(xs[-1], digits),
        "mean": round(sum(xs) / len(xs), digits),
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}{unit}" if abs(value) < 10 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain aligned text table (first column left, the others right)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# -- the machine ------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the product code differed from it (uncommitted edits)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "controlplane"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "product_code_modified": None}
    return {"commit": commit, "product_code_modified": bool(dirty)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "loadavg": loadavg(),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **code_version(),
    }


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) for the 1-minute load average to drop below `max_load`.

    Returns what happened, for the JSON: the load when the wait ended, how long it
    waited and whether the machine was quiet by then. Never raises: a busy machine is
    measured anyway and the result says so.
    """
    started = time.monotonic()
    while True:
        load = loadavg()
        waited = time.monotonic() - started
        if load[0] < max_load or waited >= max_wait_s:
            return {
                "quiet": load[0] < max_load,
                "max_load": max_load,
                "waited_s": round(waited),
                "load": load,
            }
        print(f"load {load[0]:.2f} >= {max_load}: waiting ({waited:.0f}/{max_wait_s:.0f} s)", flush=True)
        time.sleep(min(poll_s, max(1.0, max_wait_s - waited)))


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it).

    As root the hard limit is raised too when needed. Returns the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = min(max(soft, wanted), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# -- processes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    at: float
    rss_bytes: int
    cpu_s: float
    threads: int
    fds: int


class ProcStats:
    """Reads one process's resource use from /proc/<pid>."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.pid}/statm").read_text().split()
        return int(fields[1]) * PAGE_SIZE

    def cpu_s(self) -> float:
        # Fields after the command name, which is in parentheses and may hold spaces.
        rest = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        utime, stime = int(rest[11]), int(rest[12])
        return (utime + stime) / CLK_TCK

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sample(self) -> ProcSample:
        return ProcSample(time.time(), self.rss_bytes(), self.cpu_s(), self.threads(), self.fds())


def cpu_percent(before: ProcSample, after: ProcSample) -> float:
    """CPU use between two samples, in percent of one core."""
    wall = after.at - before.at
    return 0.0 if wall <= 0 else round(100.0 * (after.cpu_s - before.cpu_s) / wall, 1)


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or `MissingBinary` naming the Debian package to install."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise MissingBinary(f"{name} is not installed: apt-get install -y {package}")
    return path


@dataclass
class Processes:
    """Peer processes started for one benchmark; `stop_all` ends each, by its PID."""

    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc.pid

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self, name: str) -> None:
        if not self.alive(name):
            raise RuntimeError(f"{name} exited early:\n{self.log_tail(name)}")

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def stop(self, name: str, timeout_s: float = 5.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


@contextlib.contextmanager
def temp_workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory for one run, removed afterwards (kept with BENCH_KEEP_WORKDIR=1)."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP_WORKDIR"):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


async def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Until something accepts connections on `port`; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:g} s") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


# -- the deployment under test ----------------------------------------------------------

EXTRA_AGENTS = (("agent-east-2", "cn-east"), ("agent-south-2", "cn-south"))


def bench_config(
    agents: int = 3,
    interval_s: float | None = None,
    fall: int | None = None,
    rise: int | None = None,
    policy: Mapping[str, Any] | None = None,
    api: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo deployment on free ports; 5 agents adds one more in cn-east and cn-south.

    The probe timeout stays below the interval (80% of it), as in the demo.
    """
    if agents not in (3, 5):
        raise ValueError(f"agents must be 3 or 5 (got {agents})")
    config = remap_ports(load_demo_config())
    if agents == 5:
        taken = set(config_ports(config))
        for agent_id, region in EXTRA_AGENTS:
            raft = free_port(exclude=taken)
            taken.add(raft)
            http = free_port(exclude=taken)
            taken.add(http)
            config["cluster"]["agents"].append(
                {"id": agent_id, "region": region, "raft": f"127.0.0.1:{raft}", "http": f"127.0.0.1:{http}"}
            )
    probes = config["probes"]
    if interval_s is not None:
        probes["interval_s"] = interval_s
        probes["timeout_s"] = round(min(probes["timeout_s"], interval_s * 0.8), 3)
    if fall is not None:
        probes["fall"] = fall
    if rise is not None:
        probes["rise"] = rise
    config["policy"].update(policy or {})
    if api:
        config["api"] = {**config.get("api", {}), **api}
    return config


def config_ports(config: Mapping[str, Any]) -> list[int]:
    """Every loopback port `config` names (agents and probe targets)."""
    ports = [int(a[k].rpartition(":")[2]) for a in config["cluster"]["agents"] for k in ("raft", "http")]
    for region in config["regions"].values():
        for svc in region["services"].values():
            for t in svc["targets"]:
                url = t if isinstance(t, str) else t["url"]
                ports.append(int(url.partition("://")[2].partition("/")[0].rpartition(":")[2]))
    return ports


def agent_env(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (from `--agent-env`) as a mapping."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--agent-env: expected KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def agent_pids(cluster: Any) -> dict[str, int]:
    return {a.id: a.proc.pid for a in cluster.agents.values() if a.proc is not None}


# -- output -----------------------------------------------------------------------------


def write_json(path: Path | None, result: Mapping[str, Any]) -> None:
    if path is not None:
        path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
        print(f"wrote {path}")


def add_common_args(ap: Any) -> None:
    ap.add_argument("--json", type=Path, help="write every field as JSON to this file")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to drop below --max-load",
    )
    ap.add_argument("--max-load", type=float, default=1.5)


def execute(
    name: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, Mapping[str, Any]]],
) -> None:
    """Every benchmark's main: wait for a quiet machine if asked, run in a temp dir, write JSON."""
    args.quiet_wait = wait_for_quiet(args.max_load, args.wait_quiet) if args.wait_quiet > 0 else None
    load_before = loadavg()
    with temp_workdir(name) as workdir:
        try:
            result = dict(asyncio.run(run(args, workdir)))
        except MissingBinary as e:
            raise SystemExit(str(e)) from None
    # What every benchmark's JSON carries, whether or not its run filled it in.
    result.setdefault("load_before", load_before)
    result.setdefault("load_after", loadavg())
    result.setdefault("quiet_wait", args.quiet_wait)
    write_json(args.json, result)
