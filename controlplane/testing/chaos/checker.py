"""The history checker: one recorded schedule in, violations and latencies out.

Pure: it reads a `History` (plain JSON) and never sleeps, reads a clock or talks to an
agent, so every verdict can be recomputed from the JSON file alone, and its own tests
are hand-made histories. Every violation names the seed, the last fault step before it
and the time (seconds into the fault phase), so it can be replayed and looked at.

Invariants (see tests/chaos/README.md for how each is judged and why):

- `crash`: no agent process exits unless the schedule stopped it;
- `agreement`: one content per (epoch, revision) across every agent and every read;
- `uncommitted`: nothing served that the converged cluster's history does not hold
  (same revision, another commit);
- `monotonic`: no agent serves a lower revision of an epoch after a higher one, across
  restarts (judged in real time: the lower one was produced after the higher one was
  received);
- `fresh_lag`: no agent serves as fresh (not stale) a revision older than one some
  agent served more than `fresh_lag_s` before;
- `validity`: integer weights in 0..100 summing to 100 for a service with any weight,
  no weight to a drained region, no weight to a (region, service) whose backends have
  been down longer than the detection window plus commit slack while a majority could
  decide, unless that service is in panic or automation is frozen;
- `convergence`: after the quiet period every agent serves one revision, fresh, with
  the baseline weights, no panic, every feature on, nothing shed;
- `intent_visible` / `intent_lost`: an acknowledged intent is carried (its seq) by every
  decision at its revision or later on every agent, and still known to every agent at
  the end;
- `read_availability` / `write_availability`: reads answered while the agent runs and is
  not stopped; writes succeed while the agent is in a connected majority that nothing
  changed in for `write_settle_s` before the write and until its answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from controlplane.testing.chaos.history import POLL_TIMEOUT_S, Fault, History, Read, Write
from controlplane.testing.chaos.timeline import DOWN_MODES, Timeline

KINDS = (
    "crash",
    "agreement",
    "uncommitted",
    "monotonic",
    "fresh_lag",
    "validity",
    "convergence",
    "intent_visible",
    "intent_lost",
    "read_availability",
    "write_availability",
)


class Violation(TypedDict):
    kind: str
    seed: int
    step: int | None  # the last fault step at or before `at`
    at: float  # seconds since the fault phase began
    agent: str | None
    detail: str
    context: list[str]  # the last faults before it (intents left out), oldest first


class Report(TypedDict):
    seed: int
    violations: list[Violation]
    latencies: dict[str, list[float]]
    stats: dict[str, Any]


@dataclass
class _Check:
    h: History
    timeline: Timeline
    violations: list[Violation] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    _seen: set[tuple[str, str | None, str]] = field(default_factory=set)

    def context_at(self, t: float, agent: str | None, count: int = 3) -> list[str]:
        """The last `count` faults before `t`, and the last one that touched `agent`."""
        recent = sorted(
            (f for f in self.h["faults"] if f["at"] <= t and f["action"] not in ("intent", "delete_intent")),
            key=lambda f: f["at"],
        )
        chosen = recent[-count:]
        own = [
            f
            for f in recent
            if any(agent in f["resolved"].get(k, ()) for k in ("started", "stopped", "paused", "resumed"))
        ]
        if own and own[-1] not in chosen:
            chosen = [own[-1], *chosen]
        out = []
        for f in chosen:
            what = f["args"].get("kind") or f["args"].get("mode") or ""
            agent = f["resolved"].get("agent") or ""
            changed = [k for k in ("stopped", "started", "paused", "resumed") if f["resolved"].get(k)]
            out.append(
                " ".join(
                    x
                    for x in (
                        f"step {f['step']} t+{f['at'] - self.h['faults_from']:.1f}s {f['action']}",
                        str(what),
                        str(agent),
                        "/".join(changed),
                    )
                    if x
                )
            )
        return out

    def step_at(self, t: float) -> int | None:
        step = None
        for f in self.h["faults"]:
            if f["at"] <= t:
                step = f["step"]
        return step

    def flag(self, kind: str, t: float, agent: str | None, detail: str, key: str | None = None) -> None:
        """Record a violation; `key` deduplicates repeats of the same finding."""
        if key is not None:
            if (kind, agent, key) in self._seen:
                return
            self._seen.add((kind, agent, key))
        self.violations.append(
            Violation(
                kind=kind,
                seed=self.h["seed"],
                step=self.step_at(t),
                at=round(t - self.h["faults_from"], 3),
                agent=agent,
                detail=detail,
                context=self.context_at(t, agent),
            )
        )


def check(history: History) -> Report:
    """Every violation in `history`, with detection latencies and counts."""
    tl = Timeline.replay(history["agents"], history["started"], history["faults"])
    c = _Check(history, tl)
    served = [r for r in history["reads"] if r["status"] == 200 and r["revision"] is not None]
    for f in history["faults"]:
        if f["action"] == "crashed":
            tail = f.get("note", "").strip().splitlines()[-3:]
            code = f["resolved"].get("exit_code")
            c.flag("crash", f["at"], f["resolved"].get("agent"), f"exited by itself (code {code}): {tail}")
    _agreement(c, served)
    _uncommitted(c, served)
    _monotonic(c, served)
    _fresh_lag(c, served)
    _validity(c, served)
    _convergence(c, served)
    _intents(c, served)
    _read_availability(c)
    _write_availability(c)
    _detection(c, served)
    c.stats.update(
        reads=sum(r["count"] for r in history["reads"]),
        read_records=len(history["reads"]),
        contents=len(history["contents"]),
        writes=len(history["writes"]),
        writes_ok=sum(1 for w in history["writes"] if 200 <= w["status"] < 300),
        writes_refused=sum(1 for w in history["writes"] if 400 <= w["status"] < 500),
        writes_failed=sum(1 for w in history["writes"] if not 200 <= w["status"] < 500),
        faults=len(history["faults"]),
        truncated=history["truncated"],
    )
    return Report(seed=history["seed"], violations=c.violations, latencies=c.latencies, stats=c.stats)


def _epoch(r: Read) -> str:
    return r["epoch"] or ""


# -- agreement and commitment ---------------------------------------------------------


def _agreement(c: _Check, served: Sequence[Read]) -> None:
    by_position: dict[tuple[str, int], dict[str, Read]] = {}
    for r in sorted(served, key=lambda r: r["first_hi"]):
        assert r["revision"] is not None and r["content"] is not None
        by_position.setdefault((_epoch(r), r["revision"]), {}).setdefault(r["content"], r)
    for (epoch, revision), contents in sorted(by_position.items()):
        if len(contents) < 2:
            continue
        firsts = sorted(contents.values(), key=lambda r: r["first_hi"])
        who = "; ".join(
            f"{r['agent']} ({r['source']}, t+{r['first_hi'] - c.h['faults_from']:.2f}s, "
            f"{_summary(c.h['contents'].get(r['content'] or ''))})"
            for r in firsts
        )
        c.flag(
            "agreement",
            firsts[1]["first_hi"],
            firsts[1]["agent"],
            f"revision {_pos(epoch, revision)} served with {len(contents)} contents: {who}",
        )


def _uncommitted(c: _Check, served: Sequence[Read]) -> None:
    """A served revision whose commit is not the one the converged cluster holds."""
    committed: dict[int, float] = {}
    final_epochs = {_epoch(r) for r in served if r["first_hi"] >= c.h["healed_at"] and r["stale"] is False}
    for final in c.h["final"].values():
        for revision, at in final["decisions"].items():
            committed.setdefault(int(revision), at)
    if not committed or len(final_epochs) != 1:
        return
    (epoch,) = final_epochs
    for r in served:
        if _epoch(r) != epoch or r["revision"] not in committed:
            continue
        content = c.h["contents"].get(r["content"] or "", {})
        served_at = content.get("committed_at_unix")
        if served_at is None or math.isclose(float(served_at), committed[r["revision"]], abs_tol=1e-6):
            continue
        c.flag(
            "uncommitted",
            r["first_hi"],
            r["agent"],
            f"served revision {r['revision']} committed at {served_at} ({_summary(content)}); the cluster's "
            f"revision {r['revision']} was committed at {committed[r['revision']]}",
            key=f"{r['revision']}/{r['content']}",
        )


# -- order ------------------------------------------------------------------------------


def _monotonic(c: _Check, served: Sequence[Read]) -> None:
    by_agent: dict[tuple[str, str], list[Read]] = {}
    for r in served:
        by_agent.setdefault((r["agent"], _epoch(r)), []).append(r)
    for (agent, _epoch_key), reads in by_agent.items():
        reads.sort(key=lambda r: r["first_lo"])
        for b in reads:
            higher = [
                a
                for a in reads
                if a is not b and (a["revision"] or 0) > (b["revision"] or 0) and a["first_hi"] < b["last_lo"]
            ]
            if not higher:
                continue
            a = max(higher, key=lambda a: a["revision"] or 0)
            c.flag(
                "monotonic",
                b["last_lo"],
                agent,
                f"served revision {b['revision']} ({'stale' if b['stale'] else 'fresh'}, {b['source']}) "
                f"after revision {a['revision']} (at t+{a['first_hi'] - c.h['faults_from']:.2f}s)",
                key=f"{b['revision']}<{a['revision']}",
            )


def _fresh_lag(c: _Check, served: Sequence[Read]) -> None:
    lag_s = c.h["params"]["fresh_lag_s"]
    first_seen: dict[tuple[str, int], float] = {}
    for r in served:
        key = (_epoch(r), r["revision"] or 0)
        first_seen[key] = min(first_seen.get(key, math.inf), r["first_hi"])
    newest_by: dict[str, list[tuple[float, int]]] = {}
    for (epoch, revision), at in first_seen.items():
        newest_by.setdefault(epoch, []).append((at, revision))
    for items in newest_by.values():
        items.sort()
    for r in served:
        if r["stale"] is not False:
            continue
        newer = [
            (at, rev)
            for at, rev in newest_by[_epoch(r)]
            if rev > (r["revision"] or 0) and at < r["last_lo"] - lag_s
        ]
        if not newer:
            continue
        at, rev = newer[0]
        newest = max(rev for _, rev in newer)
        c.flag(
            "fresh_lag",
            r["last_lo"],
            r["agent"],
            f"served revision {r['revision']} as fresh ({r['source']}) {r['last_lo'] - at:.2f} s after "
            f"revision {rev} was served; {newest - (r['revision'] or 0)} revision(s) behind",
            key=f"{r['revision']}",
        )


# -- validity ---------------------------------------------------------------------------


def _validity(c: _Check, served: Sequence[Read]) -> None:
    checked: set[str] = set()
    for r in sorted(served, key=lambda r: r["first_hi"]):
        h = r["content"] or ""
        if h in checked:
            continue
        checked.add(h)
        for problem in shape_problems(c.h["contents"].get(h, {})):
            c.flag("validity", r["first_hi"], r["agent"], f"revision {r['revision']}: {problem}", key=h)
    _dead_regions(c, served)


def shape_problems(content: Mapping[str, Any]) -> list[str]:
    """What is wrong with a decision on its own: weights and drains."""
    problems = []
    services = content.get("services")
    if not isinstance(services, dict):
        return ["no services"]
    for service, placements in sorted(services.items()):
        weights = {region: p.get("weight") for region, p in placements.items()}
        bad = {
            r: w
            for r, w in weights.items()
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100
        }
        if bad:
            problems.append(f"{service}: weights not integers in 0..100: {bad}")
            continue
        total = sum(weights.values())
        if total not in (0, 100):
            problems.append(f"{service}: weights sum to {total}: {weights}")
        if total == 0 and any(p.get("state") in ("healthy", "degraded") for p in placements.values()):
            problems.append(f"{service}: no weight anywhere although some region is serving: {weights}")
        for region, p in placements.items():
            if p.get("state") == "drained" and p.get("weight", 0) > 0:
                problems.append(f"{service}/{region}: drained but given weight {p['weight']}")
    return problems


def _dead_regions(c: _Check, served: Sequence[Read]) -> None:
    p = c.h["params"]
    grace = p["detection_window_s"] + p["commit_slack_s"]
    for r in served:
        if r["stale"] is not False:
            continue
        t = r["last_lo"]  # the read was produced at or after this moment
        world = c.timeline.at(t)
        if r["agent"] not in world.majority(c.h["agents"]):
            continue
        able = c.timeline.able_since(t, p["settle_s"])
        if able is None:
            continue
        content = c.h["contents"].get(r["content"] or "", {})
        if content.get("frozen"):
            continue
        panic = set(content.get("panic_services", ()))
        for service, placements in content.get("services", {}).items():
            if service in panic:
                continue
            if _all_down_lately(c, service, t - grace, t):
                continue
            for region, placement in placements.items():
                if placement.get("weight", 0) <= 0:
                    continue
                since = c.timeline.down_since(region, service, t)
                if since is None or t < max(since, able) + grace:
                    continue
                c.flag(
                    "validity",
                    t,
                    r["agent"],
                    f"revision {r['revision']} gives {service}/{region} weight {placement['weight']} "
                    f"although its backends have been down ({world.mode(region, service)}) for "
                    f"{t - since:.1f} s and a majority could decide for {t - able + p['settle_s']:.1f} s "
                    f"(allowed {grace:.1f} s)",
                    key=f"dead {service}/{region}@{since}",
                )


def _all_down_lately(c: _Check, service: str, t0: float, t1: float) -> bool:
    """Every region of `service` down at some moment of [t0, t1]: panic territory."""
    return any(all(w.down(region, service) for region in c.h["regions"]) for w in c.timeline.between(t0, t1))


# -- the end ----------------------------------------------------------------------------


def _convergence(c: _Check, served: Sequence[Read]) -> None:
    # Judged as every agent was when the quiet period ended, as the availability checks
    # are: the recorder still polls while the runner collects its finals, a busy phase of
    # the process that also carries the agents' Raft links (the fault proxies) and the
    # simulated backends (3 agents, seed 119: both followers stale 0.7 s after the end,
    # with every pair's probe timing out in the same instant).
    end = c.h["ended"]
    last: dict[str, Read] = {}
    for r in c.h["reads"]:
        if r["source"] != "poll" or r["first_lo"] > end:
            continue
        if r["agent"] not in last or r["last_hi"] > last[r["agent"]]["last_hi"]:
            last[r["agent"]] = r
    problems = []
    for agent in c.h["agents"]:
        if agent not in last or last[agent]["status"] != 200:
            problems.append(f"{agent} answered {last[agent]['status'] if agent in last else None}")
            continue
        r = last[agent]
        if r["stale"]:
            problems.append(f"{agent} serves revision {r['revision']} stale")
        content = c.h["contents"].get(r["content"] or "", {})
        off = _off_baseline(content, c.h["baseline"])
        if off:
            problems.append(f"{agent} revision {r['revision']}: {off}")
    positions = {(_epoch(r), r["revision"]) for r in last.values() if r["status"] == 200}
    if len(positions) > 1:
        problems.append(f"agents on different revisions: { {a: r['revision'] for a, r in last.items()} }")
    if problems:
        c.flag("convergence", end, None, "not converged after the quiet period: " + "; ".join(problems))
        return
    # When the converged decision was first served by every agent.
    (position,) = positions
    firsts = []
    for agent in c.h["agents"]:
        times = [
            r["first_hi"]
            for r in served
            if r["agent"] == agent and (_epoch(r), r["revision"]) == position and r["stale"] is False
        ]
        firsts.append(min(times))
    c.stats["converged_after_s"] = round(max(firsts) - c.h["healed_at"], 3)
    c.latencies.setdefault("convergence after heal", []).append(max(0.0, max(firsts) - c.h["healed_at"]))


def _off_baseline(content: Mapping[str, Any], baseline: Mapping[str, Mapping[str, int]]) -> str:
    problems = []
    for service, base in baseline.items():
        placements = content.get("services", {}).get(service, {})
        weights = {region: placements.get(region, {}).get("weight") for region in base}
        if weights != dict(base):
            problems.append(f"{service} weights {weights}, base {dict(base)}")
    if content.get("panic"):
        problems.append("in panic")
    off = sorted(name for name, on in content.get("features", {}).items() if not on)
    if off:
        problems.append(f"features off: {off}")
    if content.get("shed_fraction", 0):
        problems.append(f"shedding {content['shed_fraction']}")
    return ", ".join(problems)


# -- intents ----------------------------------------------------------------------------


def _acknowledged(writes: Iterable[Write]) -> list[Write]:
    return [
        w
        for w in writes
        if w["method"] == "POST"
        and w["status"] in (201, 202)
        and isinstance(w["answer"], dict)
        and isinstance(w["answer"].get("seq"), int)
    ]


def _intents(c: _Check, served: Sequence[Read]) -> None:
    for w in _acknowledged(c.h["writes"]):
        answer = w["answer"]
        seq = int(answer["seq"])
        revision = answer.get("revision")
        intent_id = str(answer.get("id"))
        if isinstance(revision, int):
            for r in served:
                if (r["revision"] or 0) >= revision and (r["intent_seq"] or 0) < seq:
                    c.flag(
                        "intent_visible",
                        r["first_hi"],
                        r["agent"],
                        f"intent {intent_id} (seq {seq}) acknowledged at revision {revision} by "
                        f"{w['agent']} is not carried by revision {r['revision']} (intent_seq "
                        f"{r['intent_seq']}, {r['source']})",
                        key=f"{intent_id}@{r['revision']}",
                    )
        for agent, final in c.h["final"].items():
            if not final["reachable"]:
                continue
            if intent_id not in final["intent_ids"] and final["history_complete"]:
                c.flag(
                    "intent_lost",
                    c.h["ended"],
                    agent,
                    f"intent {intent_id} (seq {seq}, acknowledged by {w['agent']} with {w['status']}) "
                    "is neither standing nor in the history at the end",
                    key=intent_id,
                )


# -- availability -----------------------------------------------------------------------


RECORDER_LAG_S = 0.5  # how late the recorder's next poll may be on a loaded machine


def _read_availability(c: _Check) -> None:
    p = c.h["params"]
    for r in c.h["reads"]:
        if r["source"] != "poll" or r["status"] == 200:
            continue
        t0, t1 = r["first_lo"], r["last_hi"]
        if t1 - t0 < p["read_outage_s"] or t1 > c.h["ended"]:
            continue
        # A poll that fails gives up within POLL_TIMEOUT_S and the next follows at once:
        # fewer polls than that pace allows means the recorder itself was held up (a
        # loaded machine starves its event loop, and a late timer then fails a poll that
        # was answered). 5 agents seed 50: 2 polls in 5.1 s, failing at the same instant
        # as another agent's; the recorder cannot tell an outage there.
        if r["count"] < (t1 - t0) / (POLL_TIMEOUT_S + RECORDER_LAG_S):
            continue
        worlds = c.timeline.between(t0, t1)
        agent = r["agent"]
        if not all(agent in w.live() for w in worlds):
            continue
        if any(t0 < w.started_at.get(agent, 0.0) + p["read_grace_s"] for w in worlds):
            continue
        c.flag(
            "read_availability",
            t0,
            agent,
            f"reads failed ({r['status'] or 'no answer'}) for {t1 - t0:.1f} s ({r['count']} polls) while "
            "the agent was running and not stopped",
            key=f"{t0}",
        )


def _write_availability(c: _Check) -> None:
    p = c.h["params"]
    for w in c.h["writes"]:
        if 200 <= w["status"] < 500:
            continue  # done, or refused for what it asked (409 unsafe, 404 not standing)
        since = w["sent"] - p["write_settle_s"]
        worlds = c.timeline.between(since, w["received"])
        agents = c.h["agents"]
        if not all(w["agent"] in world.majority(agents) for world in worlds):
            continue
        # An agent just started may not listen yet: the same grace as for its reads
        # (found on etcd, seed 11: an agent restarted 5.0 s earlier, not answering yet).
        if w["sent"] < c.timeline.at(w["sent"]).started_at.get(w["agent"], 0.0) + p["read_grace_s"]:
            continue
        # A change while the write was in flight may depose the leader that had it
        # (the answer then says "retry"): judged only when nothing changed.
        if any(world.topology_at > since for world in worlds):
            continue
        c.flag(
            "write_availability",
            w["sent"],
            w["agent"],
            f"{w['method']} {w['path']} failed ({w['status'] or 'no answer'} {_short(w['answer'])}) after "
            f"{w['received'] - w['sent']:.2f} s although {w['agent']} was in a connected majority "
            f"for {p['write_settle_s']:g} s before",
        )


# -- latency ----------------------------------------------------------------------------


def _detection(c: _Check, served: Sequence[Read]) -> None:
    """Backend fault -> first fresh decision taking every affected pair out; partition ->
    first stale answer of each agent cut off from the majority."""
    h = c.h
    for f in h["faults"]:
        if f["action"] == "backend":
            changed = {k: v for k, v in f["resolved"].get("backends", {}).items() if v in DOWN_MODES}
            pairs = [tuple(k.split("/", 1)) for k in changed]
            if not pairs or len({g for g, _ in pairs}) == len(h["regions"]):
                continue  # nothing went down to the probes, or every region did (panic)
            mode = sorted(changed.values())[0]
            before = [r for r in served if r["stale"] is False and r["first_hi"] <= f["at"]]
            if before:
                last = h["contents"].get(max(before, key=lambda r: r["last_hi"])["content"] or "", {})
                if all(_weight(last, g, s) == 0 for g, s in pairs):
                    continue  # already out (drained, or down from an earlier fault)
            end = _healed_at(h, f)
            hits = [
                r["first_hi"]
                for r in served
                if r["stale"] is False
                and f["at"] <= r["first_lo"] <= end
                and all(_weight(h["contents"].get(r["content"] or "", {}), g, s) == 0 for g, s in pairs)
            ]
            name = f"backend {mode} -> out"
            if hits:
                c.latencies.setdefault(name, []).append(min(hits) - f["at"])
            else:
                c.stats.setdefault("undetected", []).append(
                    f"step {f['step']} {name}: healed after {end - f['at']:.1f} s"
                )
        elif f["action"] == "partition":
            world = c.timeline.at(f["at"])
            majority = world.majority(h["agents"])
            end = _healed_at(h, f)
            for agent in world.live() - majority:
                stale = [
                    r["first_hi"]
                    for r in h["reads"]
                    if r["agent"] == agent and r["stale"] and f["at"] <= r["first_lo"] <= end
                ]
                if stale:
                    c.latencies.setdefault("partition -> stale", []).append(min(stale) - f["at"])


def _weight(content: Mapping[str, Any], region: str, service: str) -> Any:
    return content.get("services", {}).get(service, {}).get(region, {}).get("weight")


def _healed_at(h: History, fault: Fault) -> float:
    """When the episode of `fault` ended: its next step (the heal), or the final heal."""
    for f in h["faults"]:
        if f["at"] > fault["at"] and f["episode"] == fault["episode"]:
            return f["at"]
    return h["healed_at"]


# -- summaries --------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """min, median, p95, max of `values` (nearest rank), rounded to ms."""
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.95 * len(ordered)) - 1))]
    return {
        "n": len(ordered),
        "min": round(ordered[0], 3),
        "median": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "max": round(ordered[-1], 3),
    }


def _pos(epoch: str, revision: int) -> str:
    return f"{epoch}.{revision}" if epoch else str(revision)


def _summary(content: Mapping[str, Any] | None) -> str:
    if not content:
        return "?"
    parts = []
    for service, placements in sorted(content.get("services", {}).items()):
        weights = "/".join(str(p.get("weight")) for _, p in sorted(placements.items()))
        parts.append(f"{service} {weights}")
    return f"committed_at={content.get('committed_at_unix')} " + ", ".join(parts)


def _short(answer: Any) -> str:
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("detail") or "")[:80]
    return ""
