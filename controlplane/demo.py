"""`controlplane demo`: a whole deployment on loopback through an outage and a recovery.

Three real agent processes (one per region) probe simulated region backends; a
simulated load balancer sends real requests by the committed weights, and a simulated
application (`testing.application`) enforces the decision with the SDK's middleware
while simulated users call it. The script takes `cn-east` down, shows the weights
moving on every agent with the reasons and the application switching the features the
decision turned off, brings the region back, shows the recovery hold, the ramp and the
features coming back, prints the traffic timelines and exits 0 when everything
happened as it should (1 otherwise, saying what did not).

`--serve` keeps the deployment running for a person to explore with a browser (the
dashboard's URL is printed), curl and cpctl.

`--drill` runs a drill instead of the outage: `cpctl drill cn-east` (a real cpctl
process) takes the region out on purpose for a while, measures the recovery time to
every agent and to the simulated load balancer (which reports what it applied, as the
real adapters do), and prints its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.client.flags import FlagsClient
from controlplane.tasks import spawn
from controlplane.testing.application import PATHS, SimApplication
from controlplane.testing.etcdlocal import EtcdUnavailable, LocalEtcd
from controlplane.testing.loadbalancer import SimLoadBalancer
from controlplane.testing.localcluster import LocalCluster, load_demo_config, remap_ports

if TYPE_CHECKING:
    from controlplane.testing.tls import Certificates

SERVICE = "order"
FAILED_REGION = "cn-east"


@dataclass
class DemoOptions:
    serve: bool = False
    drill: bool = False
    config_path: Path | None = None
    random_ports: bool = False
    backend: str = "raft"
    etcd_endpoints: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    # Agents serve HTTPS with a throwaway CA's certificate (written under log_dir, or a
    # temporary directory removed at the end).
    tls: bool = False


class Out:
    """Timestamped lines relative to the start of the demo."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    def __call__(self, text: str = "") -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}" if text else "", flush=True)


def weights_line(decision: dict[str, Any], service: str = SERVICE) -> str:
    placements = decision["services"][service]
    parts = [f"{r} {p['weight']:>3} {p['state']:<8}" for r, p in placements.items()]
    return "  ".join(parts)


def features_off(decision: dict[str, Any]) -> str:
    off = [name for name, on in decision["features"].items() if not on]
    text = ", ".join(off) if off else "none"
    if decision.get("shed_fraction"):
        text += f"; shedding {decision['shed_fraction']:.0%}"
    return text


async def wait_all(
    cluster: LocalCluster, check: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, dict[str, Any]]:
    async def all_agents() -> dict[str, dict[str, Any]] | None:
        ds = await cluster.decisions()
        if ds and all(d is not None and check(d) for d in ds.values()):
            return {k: v for k, v in ds.items() if v is not None}
        return None

    result: dict[str, dict[str, Any]] = await cluster.wait_for(all_agents, timeout_s, what, interval_s=0.05)
    return result


def print_timeline(
    out: Out, lb: SimLoadBalancer, marks: dict[float, str], revisions: dict[float, str]
) -> None:
    regions = list(lb.backends)
    header = "  t(s)  " + "".join(f"{r:>10}" for r in regions) + "    failed   event"
    print("\nTraffic timeline (requests per second through the simulated load balancer, service order)")
    print(header)
    for s in lb.history:
        t = s.at - out.t0_wall
        cells = "".join(f"{s.ok[r]:>10}" for r in regions)
        failed = sum(s.failed.values())
        events = [m for at, m in marks.items() if s.at <= at < s.at + 1]
        events += [m for at, m in revisions.items() if s.at <= at < s.at + 1]
        print(f"{t:6.0f}  {cells}  {failed:>8}   {'; '.join(events)}")


async def run_demo(options: DemoOptions) -> int:
    config = load_demo_config(options.config_path)
    if options.random_ports:
        config = remap_ports(config)
    out = Out()
    async with contextlib.AsyncExitStack() as stack:
        if options.backend == "etcd":
            endpoints = options.etcd_endpoints
            if not endpoints:
                try:
                    etcd = await stack.enter_async_context(LocalEtcd())
                except EtcdUnavailable as e:
                    print(f"controlplane demo --backend etcd: {e.message}\n  {e.detail}", file=sys.stderr)
                    print(
                        "  or point it at a running etcd: --etcd-endpoints http://HOST:2379", file=sys.stderr
                    )
                    return 2
                endpoints = [etcd.endpoint]
                out(f"started a local etcd at {etcd.endpoint} (data in {etcd.root})")
            config["backend"] = {
                "kind": "etcd",
                # A prefix of its own, so a demo never touches another deployment's keys.
                "etcd": {
                    "endpoints": endpoints,
                    "prefix": f"/controlplane-demo-{secrets.token_hex(4)}",
                    "lease_ttl_s": 3,
                },
            }
        return await _run(options, config, out)
    return 1  # pragma: no cover - the exit stack does not swallow exceptions


async def _run(options: DemoOptions, config: dict[str, Any], out: Out) -> int:
    token = os.environ.get("CONTROLPLANE_ADMIN_TOKEN") or secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        certs = None
        if options.tls:
            from controlplane.testing.tls import make_certificates

            where = options.log_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cp-tls-"))
            )
            certs = make_certificates(where / "tls")
            out(f"TLS: a throwaway CA and a certificate for 127.0.0.1/localhost in {certs.directory}")
        return await _run_cluster(options, config, out, token, certs)
    return 1  # pragma: no cover - the exit stack does not swallow exceptions


async def _run_cluster(
    options: DemoOptions, config: dict[str, Any], out: Out, token: str, certs: Certificates | None
) -> int:
    async with LocalCluster(config, admin_token=token, workdir=options.log_dir, tls=certs) as cluster:
        agents = list(cluster.agents.values())
        backend = config.get("backend", {}).get("kind", "raft")
        out(f"started 3 agents (real processes, {backend} backend) and simulated backends for 3 regions:")
        for a in agents:
            where = f"raft {a.raft}" if backend == "raft" else "etcd"
            out(f"  {a.id:<14} region {a.region:<9} {a.url}  {where}")
        ready = await cluster.wait_ready(60)
        out(f"cluster ready: leader {ready['leader']}, revision {ready['revision']}")
        out(f"  {SERVICE}: {weights_line(ready)}")
        backends = {
            r: f"http://{b.url.split('://', 1)[1].split('/', 1)[0]}"
            for (r, s), b in cluster.backends.items()
            if s == SERVICE
        }
        lb = SimLoadBalancer(
            agents=[a.url for a in agents],
            service=SERVICE,
            backends=backends,
            rps=100,
            report_as="demo-lb" if options.drill else None,
            token=token,
            ssl=cluster.client_ssl,
        )
        app = SimApplication(agents=[a.url for a in agents], rps=50, ssl=cluster.client_ssl)
        async with lb, app:
            out(f"simulated application at {app.url}: users call {', '.join(PATHS)} (50 requests/s)")
            if options.serve:
                return await serve_forever(out, cluster, token)
            if options.drill:
                return await drill_scenario(out, cluster, lb, token, options.log_dir)
            return await scripted(out, cluster, lb, app)


async def scripted(out: Out, cluster: LocalCluster, lb: SimLoadBalancer, app: SimApplication) -> int:
    marks: dict[float, str] = {}
    revisions: dict[float, str] = {}
    problems: list[str] = []
    follower = spawn("demo follow revisions", follow_revisions(cluster, revisions))
    try:
        await asyncio.sleep(3)
        out()
        out(f"FAULT: every backend in {FAILED_REGION} stops accepting connections")
        fault_at = time.time()
        marks[fault_at] = f"{FAILED_REGION} down"
        await cluster.fail_region(FAILED_REGION)
        moved = await wait_all(
            cluster,
            lambda d: d["services"][SERVICE][FAILED_REGION]["weight"] == 0,
            30,
            f"{FAILED_REGION} weight 0 on every agent",
        )
        elapsed = time.time() - fault_at
        d = next(iter(moved.values()))
        rev = d["revision"]
        out(f"every agent serves revision {rev} without {FAILED_REGION}, {elapsed:.1f} s after the fault")
        out(f"  {SERVICE}: {weights_line(d)}")
        out(f"  features off: {features_off(d)}")
        for reason in d["reasons"]:
            out(f"  reason: {reason}")
        budget = cluster.config["policy"].get("failover_budget_s", 30)
        if elapsed > budget:
            problems.append(f"failover took {elapsed:.1f} s, over the {budget} s budget")
        switched_off = [name for name, on in d["features"].items() if not on and f"/{name}" in PATHS]
        await asyncio.sleep(4)
        for name in switched_off:
            refused = app.refused(f"/{name}", since=fault_at)
            out(f"application: /{name} refused {refused} times (503, feature {name} off) since the fault")
            if refused == 0:
                problems.append(f"the application never refused /{name} while {name} was off")
        if not switched_off:
            problems.append("no feature the application serves was switched off during the outage")

        out()
        out(f"RECOVERY: {FAILED_REGION} backends answer again")
        healed_at = time.time()
        marks[healed_at] = f"{FAILED_REGION} back"
        await cluster.heal_region(FAILED_REGION)
        held = await wait_all(
            cluster,
            lambda d: (
                "recovering" in " ".join(d["reasons"]) or d["services"][SERVICE][FAILED_REGION]["weight"] > 0
            ),
            30,
            "the recovery hold",
        )
        d = next(iter(held.values()))
        out(f"verdict up again, revision {d['revision']}: held before taking traffic")
        for reason in d["reasons"]:
            if "recovering" in reason:
                out(f"  reason: {reason}")
        seen_weights: list[int] = []
        base = None

        async def fully_back() -> dict[str, Any] | None:
            nonlocal base
            ds = await cluster.decisions()
            first = next(iter(ds.values()), None)
            if first is None:
                return None
            w = first["services"][SERVICE][FAILED_REGION]["weight"]
            if not seen_weights or seen_weights[-1] != w:
                seen_weights.append(w)
                if w > 0:
                    out(f"  revision {first['revision']}: {SERVICE}: {weights_line(first)}")
            ramping = any("ramping" in r or "recovering" in r for r in first["reasons"])
            same = len({x["revision"] for x in ds.values() if x}) == 1
            return first if w > 0 and not ramping and same and all(ds.values()) else None

        final = await cluster.wait_for(fully_back, 60, f"{FAILED_REGION} fully ramped", interval_s=0.05)
        back_s = time.time() - healed_at
        out(f"{FAILED_REGION} fully back after {back_s:.1f} s; features off: {features_off(final)}")
        ramp_steps = [w for w in seen_weights if w > 0]
        if len(ramp_steps) < 2:
            problems.append(f"expected a ramp in steps, saw weights {seen_weights}")
        flags = app.flags
        assert flags is not None
        await cluster.wait_for(
            lambda: _all_on(flags, switched_off), 30, "the application's features back on", interval_s=0.1
        )
        restored_at = time.time()
        await asyncio.sleep(2)
        for name in switched_off:
            served = app.served(f"/{name}", since=restored_at)
            out(f"application: /{name} served {served} times again once {name} came back on")
            if served == 0:
                problems.append(f"the application did not serve /{name} again after recovery")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    print_timeline(out, lb, marks, revisions)
    print_app_timeline(out, app, marks)
    ok, failed = lb.totals()
    print(
        f"\nrequests: {sum(ok.values())} ok, {sum(failed.values())} failed "
        f"({', '.join(f'{r} {n}' for r, n in sorted(failed.items())) or 'none'})"
    )
    if problems:
        print("\nDEMO FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(
        "\ndemo finished: outage detected, traffic moved, region recovered through hold and ramp; "
        "the application switched the features off and back on"
    )
    return 0


async def _all_on(flags: FlagsClient, names: list[str]) -> bool:
    return all(flags.enabled(name) for name in names)


def print_app_timeline(out: Out, app: SimApplication, marks: dict[float, str]) -> None:
    """Per second and path: served, and refused (f: feature off, s: shed)."""
    print(
        "\nApplication timeline (simulated users; per path: served, f = refused as a feature off, s = shed)"
    )
    print("  t(s)  " + "".join(f"{p:>18}" for p in PATHS) + "   event")
    for s in app.history:
        t = s.at - out.t0_wall
        cells = []
        for p in PATHS:
            cell = str(s.served[p])
            if s.feature_off[p]:
                cell += f" f{s.feature_off[p]}"
            if s.shed[p]:
                cell += f" s{s.shed[p]}"
            if s.failed[p]:
                cell += f" x{s.failed[p]}"
            cells.append(f"{cell:>18}")
        events = [m for at, m in marks.items() if s.at <= at < s.at + 1]
        print(f"{t:6.0f}  {''.join(cells)}   {'; '.join(events)}")


async def follow_revisions(cluster: LocalCluster, revisions: dict[float, str]) -> None:
    seen = 0
    while True:
        ds = await cluster.decisions()
        for d in ds.values():
            if d and d["revision"] > seen:
                seen = d["revision"]
                revisions[time.time()] = f"rev {seen}: " + weights_short(d)
        await asyncio.sleep(0.1)


def weights_short(d: dict[str, Any]) -> str:
    return "/".join(str(p["weight"]) for p in d["services"][SERVICE].values())


DRILL_DURATION_S = 12
DRILL_OBJECTIVE_S = 10


async def drill_scenario(
    out: Out, cluster: LocalCluster, lb: SimLoadBalancer, token: str, log_dir: Path | None
) -> int:
    """`cpctl drill` on the local deployment, as an operator would run it; its exit code."""
    report_dir = log_dir or Path(tempfile.mkdtemp(prefix="controlplane-drill-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / f"drill-{FAILED_REGION}.md"
    await asyncio.sleep(2)  # the load balancer's first report
    argv = [
        sys.executable, "-m", "controlplane.cpctl", "drill", FAILED_REGION,
        "--duration", f"{DRILL_DURATION_S}s", "--objective", f"{DRILL_OBJECTIVE_S}s",
        "--reason", "demo: prove the recovery time", "--report", str(report), "--yes",
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")},
        "CPCTL_ENDPOINT": ",".join(a.url for a in cluster.agents.values()),
        "CPCTL_TOKEN": token,
    }
    if cluster.tls is not None:
        env["CPCTL_CA_FILE"] = str(cluster.tls.ca_file)
    out()
    out(f"DRILL: {' '.join(argv[2:])}")
    started = time.time()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DRILL_DURATION_S + 120):
            async for line in proc.stdout:
                out(f"  cpctl | {line.decode(errors='replace').rstrip()}")
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ok, failed = lb.totals(since=started)
    out(f"simulated load balancer during the drill: {sum(ok.values())} requests served, "
        f"{sum(failed.values())} failed; by region {dict(ok)}")  # fmt: skip
    if report.exists():
        print(f"\n----- {report} -----\n{report.read_text()}", flush=True)
    verdict = "passed" if code == 0 else "FAILED"
    out(f"drill {verdict} (cpctl exit {code}); report and timeline in {report_dir}")
    return code


async def serve_forever(out: Out, cluster: LocalCluster, token: str) -> int:
    first = next(iter(cluster.agents.values()))
    endpoints = ",".join(a.url for a in cluster.agents.values())
    cpctl = Path(sys.executable).with_name("cpctl")
    out()
    out(f"dashboard: {first.url}/ui/  (paste the admin token there to act; every agent serves it)")
    if cluster.tls is not None:
        out(
            f"  (HTTPS with a throwaway CA: your browser will warn; its certificate is {cluster.tls.ca_file})"
        )
    out(f"the deployment keeps running; cpctl is {cpctl} (or: source {cpctl.parent}/activate); try:")
    ca = cluster.tls.ca_file if cluster.tls is not None else None
    trust = f"\n    export CPCTL_CA_FILE={ca}" if ca is not None else ""
    curl = f"curl -s --cacert {ca}" if ca is not None else "curl -s"
    print(
        f"""
    export PATH={cpctl.parent}:$PATH
    export CPCTL_ENDPOINT={endpoints}
    export CPCTL_TOKEN={token}{trust}
    {curl} {first.url}/v1/decision | python3 -m json.tool
    {curl} {first.url}/v1/cluster
    cpctl status
    cpctl drill cn-east --duration 1m --objective 10s --reason "try a drill" --yes
    cpctl drain cn-east --reason "try a drain" --yes
    cpctl undrain cn-east --reason "done" --yes

  Ctrl-C stops everything.
""",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    out("stopping")
    return 0
