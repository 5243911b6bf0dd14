"""`python -m controlplane.testing.chaos`: run schedules, check them, print a summary.

    python -m controlplane.testing.chaos --schedules 20 --seed 1 --agents 5 --backend raft
    python -m controlplane.testing.chaos --seed 7 --print-schedule     # what seed 7 does
    python -m controlplane.testing.chaos --check chaos-out/seed-7.json  # re-judge a history

Schedule i uses seed `seed + i`. Each history is written as JSON to `--out` (one file per
schedule, with its report), and a summary (violations by kind with seeds, latencies,
throughput) to `--out/summary.json`. A schedule that was flagged, or failed to run, keeps
its agents' logs and configs in `--out/seed-N-logs/` (a replay may not hit the same
timing again); a clean one keeps nothing. Exit status 1 when any violation was found.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from controlplane.testing.chaos.checker import KINDS, Report, check, percentiles
from controlplane.testing.chaos.history import dumps, loads
from controlplane.testing.chaos.runner import Options, cluster_config, run_schedule, shape_of
from controlplane.testing.chaos.schedule import generate

DESCRIPTION = "Run seeded fault schedules against real agents and check the histories."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m controlplane.testing.chaos", description=DESCRIPTION)
    ap.add_argument("--schedules", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--agents", type=int, choices=(3, 5), default=3)
    ap.add_argument("--backend", choices=("raft", "etcd"), default="raft")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of faults per schedule")
    ap.add_argument("--quiet-max", type=float, default=45.0, help="bound on the wait for convergence")
    ap.add_argument("--out", type=Path, default=Path("chaos-out"))
    ap.add_argument("--mix", default="", help="kind=weight,... over the default mix (kill, pause, ...)")
    ap.add_argument("--print-schedule", action="store_true", help="print the schedule of --seed and exit")
    ap.add_argument("--check", type=Path, nargs="*", help="re-check recorded histories and exit")
    ap.add_argument("--quiet", action="store_true", help="do not print each schedule")
    return ap.parse_args(argv)


def parse_mix(text: str) -> dict[str, float] | None:
    if not text:
        return None
    from controlplane.testing.chaos.schedule import DEFAULT_MIX

    mix = dict(DEFAULT_MIX)
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in mix:
            raise SystemExit(f"--mix: unknown kind {key!r} (kinds: {', '.join(mix)})")
        mix[key.strip()] = float(value)
    return mix


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        reports = [check(loads(p.read_bytes())) for p in args.check]
        print(summary_table(reports, elapsed_s=None))
        return 1 if any(r["violations"] for r in reports) else 0
    options = Options(
        agents=args.agents,
        backend=args.backend,
        duration_s=args.duration,
        quiet_max_s=args.quiet_max,
        mix=parse_mix(args.mix),
    )
    if args.print_schedule:
        config = cluster_config(args.agents, "raft")
        print(generate(args.seed, shape_of(config, options)).describe())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    options = dataclasses.replace(options, workdir=args.out / "work")
    reports, errors = asyncio.run(run_many(args, options))
    return 1 if errors or any(r["violations"] for r in reports) else 0


async def run_many(args: argparse.Namespace, options: Options) -> tuple[list[Report], list[str]]:
    """Run the schedules one after another; the reports, and the runs that failed to run.

    A schedule whose run fails (a port taken, an agent that never started) is recorded
    with its traceback, counted in the summary and makes the exit code 1; the next
    schedule still runs, so one bad start does not cost a whole night's run.
    """
    out: Path = args.out
    reports: list[Report] = []
    errors: list[str] = []
    began = time.monotonic()
    for i in range(args.schedules):
        seed = args.seed + i
        t0 = time.monotonic()
        say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
        try:
            history = await run_schedule(seed, options, log=say)
        except Exception:
            errors.append(f"seed {seed}: {traceback.format_exc(limit=3)}")
            print(f"seed {seed}: the run itself failed:\n{errors[-1]}", file=sys.stderr, flush=True)
            keep_logs(options.workdir, seed, out, keep=True)
            continue
        report = check(history)
        keep_logs(options.workdir, seed, out, keep=bool(report["violations"]))
        reports.append(report)
        (out / f"seed-{seed}.json").write_bytes(dumps(history))
        (out / f"seed-{seed}.report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        kinds = sorted({v["kind"] for v in report["violations"]})
        print(
            f"seed {seed}: {len(report['violations'])} violation(s) {kinds} in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        for v in report["violations"][:20]:
            print(f"  {describe(v)}\n      after: {'; '.join(v.get('context', []))}", flush=True)
    elapsed = time.monotonic() - began
    table = summary_table(reports, elapsed_s=elapsed, errors=errors)
    print(table)
    summary = {
        "command": " ".join(sys.argv),
        "agents": options.agents,
        "backend": options.backend,
        "seeds": [args.seed, args.seed + args.schedules - 1],
        "schedules": len(reports),
        "run_errors": errors,
        "elapsed_s": round(elapsed, 1),
        "schedules_per_hour": round(len(reports) * 3600 / elapsed, 1) if elapsed > 0 else None,
        "violations": by_kind(reports),
        "latencies": {k: percentiles(v) for k, v in latencies(reports).items()},
    }
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(f"wrote {out}/summary.json and one history per seed")
    return reports, errors


def keep_logs(work: Path | None, seed: int, out: Path, *, keep: bool) -> None:
    """Copy a schedule's agent logs and configs to `out/seed-N-logs` when `keep`; then
    remove its work directory (agents' data, etcd's) either way."""
    if work is None:
        return
    dirs = [work / f"seed-{seed}", work / f"etcd-{seed}"]
    if keep and dirs[0].is_dir():
        dest = out / f"seed-{seed}-logs"
        dest.mkdir(parents=True, exist_ok=True)
        for path in dirs[0].iterdir():
            if path.is_file() and path.suffix in (".log", ".yaml"):
                shutil.copy2(path, dest / path.name)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def describe(v: Any) -> str:
    where = f"seed {v['seed']} step {v['step']} t+{v['at']:.2f}s {v['agent'] or '-'}"
    return f"[{v['kind']}] {where}: {v['detail']}"


def by_kind(reports: Sequence[Report]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        found = [v for r in reports for v in r["violations"] if v["kind"] == kind]
        out[kind] = {
            "count": len(found),
            "seeds": sorted({v["seed"] for v in found}),
            "examples": [describe(v) for v in found[:5]],
        }
    return out


def latencies(reports: Sequence[Report]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in reports:
        for name, values in r["latencies"].items():
            out.setdefault(name, []).extend(values)
    return out


def summary_table(reports: Sequence[Report], elapsed_s: float | None, errors: Sequence[str] = ()) -> str:
    lines = [f"{'invariant':<20} {'violations':>10}  seeds"]
    for kind, found in by_kind(reports).items():
        seeds = ", ".join(str(s) for s in found["seeds"][:12]) + (" ..." if len(found["seeds"]) > 12 else "")
        lines.append(f"{kind:<20} {found['count']:>10}  {seeds}")
    lines.append("")
    lines.append(f"{'latency (s)':<28} {'n':>4} {'min':>7} {'median':>7} {'p95':>7} {'max':>7}")
    for name, values in sorted(latencies(reports).items()):
        p = percentiles(values)
        lines.append(
            f"{name:<28} {p['n']:>4.0f} {p['min']:>7.2f} {p['median']:>7.2f} "
            f"{p['p95']:>7.2f} {p['max']:>7.2f}"
        )
    clean = sum(1 for r in reports if not r["violations"])
    lines.append("")
    lines.append(f"schedules: {len(reports)} checked, {clean} clean, {len(errors)} failed to run")
    if elapsed_s:
        lines.append(f"elapsed: {elapsed_s:.0f} s, {len(reports) * 3600 / elapsed_s:.0f} schedules/hour")
    return "\n".join(lines)
