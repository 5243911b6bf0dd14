"""How fast a feature switch reaches applications, and what shedding costs per request.

    python -m bench.flags [--rounds 20] [--poll-ms 50] [--json FILE]

Three real agents (the demo deployment on free ports). Each round an operator intent
switches `comments` off (then on again, alternating), and four readers note when they
see the new value:

- `ofrep-single`: `POST /ofrep/v1/evaluate/flags/comments` every `--poll-ms` (what the
  generic OFREP provider does on each evaluation; here at a fixed rate);
- `ofrep-bulk`: `POST /ofrep/v1/evaluate/flags` with `If-None-Match` every `--poll-ms`
  (a client-side OFREP provider polling; 304 while nothing changed);
- `flags-client`: the SDK's `FlagsClient` (long-poll), checked every millisecond;
- `provider`: the SDK's OpenFeature `ControlplaneProvider` (its own FlagsClient in a
  thread), evaluated every millisecond.

Latency is from the moment the intent was sent to the first read of the new value.
Then `Shedder.check` is timed on its own (per call, no I/O).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    add_common_args,
    bench_config,
    execute,
    fmt,
    loadavg,
    machine,
    percentiles,
    print_table,
)
from controlplane.client import FlagsClient
from controlplane.client.shedding import Shedder
from controlplane.testing.localcluster import LocalCluster

FLAG = "comments"
READERS = ("ofrep-single", "ofrep-bulk", "flags-client", "provider")


class Seen:
    """When each reader first saw each round's value (monotonic seconds)."""

    def __init__(self) -> None:
        self.expected: bool | None = None
        self.at: dict[str, float] = {}

    def saw(self, reader: str, value: bool) -> None:
        if value == self.expected and reader not in self.at:
            self.at[reader] = time.monotonic()


async def poll_ofrep(base: str, poll_s: float, seen: Seen, stop: asyncio.Event) -> None:
    etag = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.post(f"{base}/ofrep/v1/evaluate/flags/{FLAG}", json={}) as r:
                    seen.saw("ofrep-single", (await r.json())["value"])
                async with s.post(
                    f"{base}/ofrep/v1/evaluate/flags", json={}, headers={"If-None-Match": etag}
                ) as r:
                    if r.status == 200:
                        etag = r.headers.get("ETag", "")
                        flags = {f["key"]: f["value"] for f in (await r.json())["flags"]}
                        seen.saw("ofrep-bulk", flags[FLAG])
            await asyncio.sleep(poll_s)


def poll_provider(seen: Seen, agents: list[str], stop: threading.Event) -> None:
    from openfeature import api

    from controlplane.client.openfeature_provider import ControlplaneProvider

    api.set_provider_and_wait(ControlplaneProvider(agents, wait_s=10), domain="bench")
    client = api.get_client("bench")
    try:
        while not stop.is_set():
            seen.saw("provider", client.get_boolean_value(FLAG, True))
            time.sleep(0.001)
    finally:
        api.clear_providers()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_before = loadavg()
    rounds: list[dict[str, float]] = []
    async with LocalCluster(bench_config(), workdir=workdir / "cluster") as c:
        await c.wait_ready(90)
        await c.settled()
        agents = [a.url for a in c.agents.values()]
        seen = Seen()
        stop = asyncio.Event()
        stop_thread = threading.Event()
        provider = threading.Thread(target=poll_provider, args=(seen, agents, stop_thread), daemon=True)
        provider.start()
        async with FlagsClient(agents, wait_s=10) as flags:

            async def poll_flags() -> None:
                while not stop.is_set():
                    seen.saw("flags-client", flags.enabled(FLAG))
                    await asyncio.sleep(0.001)

            tasks = [
                asyncio.create_task(poll_ofrep(agents[1], args.poll_ms / 1000, seen, stop)),
                asyncio.create_task(poll_flags()),
            ]
            try:
                await asyncio.sleep(2.0)  # every reader has the current value
                for n in range(args.rounds):
                    value = n % 2 == 1  # off first, then on, ...
                    seen.expected, seen.at = value, {}
                    sent = time.monotonic()
                    status, body = await c.post(
                        next(iter(c.agents)),
                        "/v1/intents",
                        {"kind": "feature", "name": FLAG, "enabled": value, "reason": "bench"},
                    )
                    if status not in (201, 202):
                        raise SystemExit(f"intent refused: {status} {body}")
                    committed = time.monotonic()
                    deadline = sent + 10.0
                    # Polled: one reader notes what it saw from a thread of its own.
                    while len(seen.at) < len(READERS) and time.monotonic() < deadline:  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
                    missing = [r for r in READERS if r not in seen.at]
                    if missing:
                        raise SystemExit(f"round {n}: {missing} never saw {FLAG}={value}")
                    rounds.append({"commit_s": committed - sent, **{r: seen.at[r] - sent for r in READERS}})
                    await asyncio.sleep(0.3)
            finally:
                stop.set()
                stop_thread.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.to_thread(provider.join, 10)

    propagation = {r: percentiles([x[r] * 1000 for x in rounds]) for r in ("commit_s", *READERS)}
    print(f"\nfeature switch to reader, ms, {len(rounds)} rounds (OFREP polled every {args.poll_ms:g} ms)")
    print_table(
        ["reader", "p50", "p95", "max"],
        [[r, fmt(p["p50"]), fmt(p["p95"]), fmt(p["max"])] for r, p in propagation.items()],
    )

    shed_us = time_shedder(args.checks)
    print(f"\nShedder.check: {shed_us:.2f} us per call ({args.checks} calls, low priority, fraction 0.3)")
    return {
        "benchmark": "flags",
        "parameters": {"rounds": args.rounds, "poll_ms": args.poll_ms, "checks": args.checks},
        "machine": machine(),
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_wait": args.quiet_wait,
        "propagation_ms": propagation,
        "rounds": rounds,
        "shedder_check_us": shed_us,
    }


def time_shedder(calls: int) -> float:
    shedder = Shedder(lambda: 0.3)
    keys = [f"user-{i}" for i in range(min(calls, 10_000))]
    check: Callable[..., Any] = shedder.check
    started = time.perf_counter()
    for i in range(calls):
        check(keys[i % len(keys)], "low")
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--poll-ms", type=float, default=50.0, help="OFREP poll interval")
    ap.add_argument("--checks", type=int, default=200_000, help="Shedder.check calls to time")
    add_common_args(ap)
    args = ap.parse_args()
    execute("flags", args, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
