"""How long decide() takes on a large deployment.

    python -m bench.decide [--regions 50] [--services 20] [--observers 9] [--runs 300] [--json FILE]

decide() runs on the leader on every change (an observation flip, an intent, a hold
expiring), so it must stay far below the probe interval. Each run alternates between a
healthy world and one with a region down, feeding the previous decision back in, so
every run builds a new decision instead of returning the old one.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import orjson

from controlplane.decide import decide
from controlplane.intents import apply_intent
from controlplane.model import Decision, FeatureSpec, Intent, IntentKind, Observation, Policy, RegionSpec


def build(regions: int, services: int, observers: int) -> tuple[Policy, list[str], dict[str, Intent]]:
    names = [f"region-{i:02d}" for i in range(regions)]
    svcs = [f"svc-{j:02d}" for j in range(services)]
    specs = tuple(
        RegionSpec(
            name=r,
            capacity_rps=dict.fromkeys(svcs, 1000.0 + 37 * i),
            base_weight=dict.fromkeys(svcs, 1000.0 + 37 * i),
        )
        for i, r in enumerate(names)
    )
    features = tuple(FeatureSpec(f"feature-{k}", level=2 + k % 3, saves=0.03) for k in range(10))
    policy = Policy(
        regions=specs,
        services=tuple(svcs),
        demand_rps=dict.fromkeys(svcs, 40000.0),
        features=features,
        recovery_hold_s=30.0,
    )
    standing: dict[str, Intent] = {}
    for n, intent in enumerate(
        [
            Intent(id="i1", kind=IntentKind.DRAIN, reason="maintenance", region=names[3]),
            Intent(
                id="i2",
                kind=IntentKind.FAILOVER,
                reason="drill",
                from_region=names[5],
                to_region=names[6],
                service=svcs[0],
            ),
            Intent(
                id="i3",
                kind=IntentKind.OVERRIDE,
                reason="canary",
                service=svcs[1],
                weights={names[0]: 50, names[1]: 50},
            ),
            Intent(id="i4", kind=IntentKind.FEATURE, reason="bug", feature="feature-0", enabled=False),
        ],
        start=1,
    ):
        standing = apply_intent(standing, replace(intent, seq=n))
    return policy, [f"agent-{k}" for k in range(observers)], standing


def observations(policy: Policy, observers: list[str], now: float, down: str | None) -> list[Observation]:
    return [
        Observation(
            observer=o,
            region=r.name,
            service=s,
            up=r.name != down,
            at=now,
            latency_ms=12.0,
            error=None if r.name != down else "connect timeout",
        )
        for o in observers
        for r in policy.regions
        for s in policy.services
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", type=int, default=50)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--observers", type=int, default=9)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    policy, observers, intents = build(args.regions, args.services, args.observers)
    worlds = [
        observations(policy, observers, 0.0, None),
        observations(policy, observers, 0.0, policy.regions[10].name),
    ]
    previous: Decision | None = None
    timings_ms = []
    now = 1000.0
    for run in range(args.runs + 10):
        now += 1.0
        fresh = [replace(o, at=now) for o in worlds[run % 2]]  # all fresh, stamped outside the timer
        start = time.perf_counter()
        previous = decide(policy, fresh, intents, previous, now)
        elapsed = (time.perf_counter() - start) * 1000
        if run >= 10:  # warm-up
            timings_ms.append(elapsed)
    timings_ms.sort()
    result = {
        "benchmark": "decide",
        "regions": args.regions,
        "services": args.services,
        "observers": args.observers,
        "observations": len(worlds[0]),
        "intents": len(intents),
        "runs": args.runs,
        "median_ms": round(statistics.median(timings_ms), 3),
        "p99_ms": round(timings_ms[min(len(timings_ms) - 1, int(len(timings_ms) * 0.99))], 3),
        "max_ms": round(timings_ms[-1], 3),
        "final_revision": previous.revision if previous else 0,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
    }
    print(
        f"decide(): {args.regions} regions x {args.services} services, {args.observers} observers "
        f"({result['observations']} observations), {len(intents)} intents, {args.runs} runs"
    )
    print(f"  median {result['median_ms']} ms   p99 {result['p99_ms']} ms   max {result['max_ms']} ms")
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
