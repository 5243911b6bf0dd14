"""Read throughput and latency of an agent's API under wrk, against nginx serving the same bytes.

    python -m bench.api [--duration 10] [--connections 50] [--threads 1] [--repeat 2] [--json FILE]

A real 3-agent cluster; wrk (Debian `wrk`, keep-alive, `--latency`) loads one follower
agent's `GET /v1/decision` and `GET /v1/weights/order?format=haproxy` (falling back to
`format=json`, and saying so, if the haproxy renderer answers an error). The baseline,
in the same run: nginx (Debian `nginx`, one worker process, as the agent is one
process) serving the very bytes the agent answered, from files. The runs are interleaved
(agent, nginx, agent, nginx, ...) `--repeat` times so the machine's load hits both alike;
the table shows the median of the repeats and the ratio agent / nginx.

wrk, the agent and nginx share the machine's 2 cores: the numbers are what one agent
process serves while a load generator runs next to it, not a server-class figure. The
agent's own CPU use during each run is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.common import (
    Processes,
    ProcStats,
    add_common_args,
    agent_env,
    bench_config,
    cpu_percent,
    execute,
    loadavg,
    machine,
    print_table,
    ratio,
    require_binary,
    wait_port,
)
from controlplane.testing.localcluster import LocalCluster
from controlplane.testing.ports import free_port

TARGET_RPS = 10_000
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_duration_ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), request count and errors from `wrk --latency`."""
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in ([0-9.]+\w+)", out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    latency = {
        f"p{m.group(1)}": round(parse_duration_ms(m.group(2)), 3)
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE)
    }
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "latency_ms": latency,
        "socket_errors": errors,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def nginx_conf(workdir: Path, port: int, routes: dict[str, tuple[str, str]]) -> Path:
    """nginx with one worker, serving each route (path -> (file, content type)) from a file."""
    locations = "\n".join(
        f"        location = {path} {{ default_type {ctype}; alias {workdir / 'html' / name}; }}"
        for path, (name, ctype) in routes.items()
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # the files are in a private temp dir
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'nginx-error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n    access_log off;\n    keepalive_requests 1000000;\n"
        f"    client_body_temp_path {temp};\n    proxy_temp_path {temp};\n    fastcgi_temp_path {temp};\n"
        f"    uwsgi_temp_path {temp};\n    scgi_temp_path {temp};\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n{locations}\n    }}\n}}\n"
    )
    return conf


async def wrk(binary: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        binary,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "5s",
        "--latency",
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        async with asyncio.timeout(args.duration + 30):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_wrk(out.decode())


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    wrk_bin = require_binary("wrk", "wrk")
    nginx_bin = require_binary("nginx", "nginx")
    (workdir / "html").mkdir()
    procs = Processes(workdir)
    load_before = loadavg()
    measured = machine()  # at the start: the commit the agents run
    notes: list[str] = []
    runs: list[dict[str, Any]] = []
    try:
        async with LocalCluster(
            bench_config(), workdir=workdir / "cluster", extra_env=agent_env(args.agent_env)
        ) as cluster:
            await cluster.wait_ready(90)
            leader = await cluster.wait_leader(30)
            agent = next(a for a in cluster.agents if a != leader)
            base = cluster.agents[agent].url
            weights_path = "/v1/weights/order?format=haproxy"
            async with cluster.session.get(base + weights_path) as r:
                weights_body, weights_type = await r.read(), r.content_type
                weights_status = r.status
            if weights_status != 200:
                notes.append(f"{weights_path} answered {weights_status}: measured format=json instead")
                weights_path = "/v1/weights/order?format=json"
                async with cluster.session.get(base + weights_path) as r:
                    weights_body, weights_type = await r.read(), r.content_type
            async with cluster.session.get(base + "/v1/decision") as r:
                decision_body = await r.read()
            (workdir / "html" / "decision.json").write_bytes(decision_body)
            (workdir / "html" / "weights").write_bytes(weights_body)
            port = free_port()
            conf = nginx_conf(
                workdir,
                port,
                {
                    "/v1/decision": ("decision.json", "application/json"),
                    "/v1/weights/order": ("weights", weights_type),
                },
            )
            procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf), "-e", "stderr"])
            await wait_port(port)
            nginx = f"http://127.0.0.1:{port}"
            async with cluster.session.get(nginx + weights_path) as r:
                if await r.read() != weights_body:
                    raise RuntimeError("nginx does not serve the same weights bytes as the agent")
            proc = cluster.agents[agent].proc
            assert proc is not None
            stats = ProcStats(proc.pid)
            endpoints = {"decision": "/v1/decision", "weights": weights_path}
            print(f"loading {agent} (pid {proc.pid}) and nginx on port {port}", flush=True)
            for rep in range(args.repeat):
                for name, path in endpoints.items():
                    for server, url in (("agent", base + path), ("nginx", nginx + path)):
                        before = stats.sample()
                        result = await wrk(wrk_bin, url, args)
                        after = stats.sample()
                        result.update(
                            {
                                "endpoint": name,
                                "server": server,
                                "repeat": rep,
                                "agent_cpu_percent": cpu_percent(before, after),
                            }
                        )
                        runs.append(result)
                        print(
                            f"{name:8} {server:5} {result['rps']:9.0f} req/s  p50 "
                            f"{result['latency_ms'].get('p50')} ms  p99 {result['latency_ms'].get('p99')} ms",
                            flush=True,
                        )
                        await asyncio.sleep(1.0)
            procs.check_alive("nginx")
            bytes_served = {"decision": len(decision_body), "weights": len(weights_body)}
    finally:
        procs.stop_all()

    summary: dict[str, Any] = {}
    rows = []
    for name in ("decision", "weights"):
        entry: dict[str, Any] = {"path": endpoints[name], "bytes": bytes_served[name]}
        for server in ("agent", "nginx"):
            mine = [r for r in runs if r["endpoint"] == name and r["server"] == server]
            entry[server] = {
                "rps_median": round(statistics.median(r["rps"] for r in mine)),
                "p50_ms_median": statistics.median(r["latency_ms"]["p50"] for r in mine),
                "p99_ms_median": statistics.median(r["latency_ms"]["p99"] for r in mine),
                "errors": sum(r["socket_errors"] + r["non_2xx"] for r in mine),
            }
        entry["rps_ratio_agent_over_nginx"] = ratio(
            entry["agent"]["rps_median"], entry["nginx"]["rps_median"], 3
        )
        summary[name] = entry
        for server in ("agent", "nginx"):
            e = entry[server]
            rows.append(
                [
                    f"{endpoints[name]} {server}",
                    e["rps_median"],
                    e["p50_ms_median"],
                    e["p99_ms_median"],
                    e["errors"],
                    entry["rps_ratio_agent_over_nginx"] if server == "agent" else "",
                ]
            )
    print(
        f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, median of {args.repeat}, "
        f"{bytes_served['decision']} B decision"
    )
    print_table(["", "req/s", "p50 ms", "p99 ms", "errors", "agent/nginx"], rows)
    for n in notes:
        print(f"note: {n}")
    decision_rps = summary["decision"]["agent"]["rps_median"]
    print(f"/v1/decision {decision_rps} req/s vs target {TARGET_RPS}; load {loadavg()}")
    return {
        "benchmark": "api",
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "repeat": args.repeat,
            "agent": agent,
            "nginx_workers": 1,
            "agent_env": args.agent_env,
        },
        "machine": measured,
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_wait": args.quiet_wait,
        "notes": notes,
        "runs": runs,
        "summary": summary,
        "targets": {
            "decision_rps_target": TARGET_RPS,
            "decision_rps": decision_rps,
            "decision_rps_met": decision_rps >= TARGET_RPS,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the agents (e.g. to try a proposed fix); repeatable",
    )
    add_common_args(ap)
    args = ap.parse_args()
    execute("api", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
