"""The agent's work: publish what it sees, and (on the leader) decide and commit.

Publishing happens on every change the prober reports and again every refresh period,
so a live agent's observations never expire and a dead agent's do. Deciding happens on
every change of the replicated state and at least every `tick_s` (holds expire and
ramps step with time alone). Only the leader commits, in its own term; a lost
compare-and-set (another leader got there first, or this one was deposed) is normal
and retried on the next change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace

from controlplane.agent.node import Node
from controlplane.decide import decide
from controlplane.decide.verdicts import is_fresh, quorum_for
from controlplane.errors import Conflict, NotFound, NotLeader, StoreError
from controlplane.intents import expired
from controlplane.model import Decision, Intent, Observation, State, iso_time
from controlplane.probes import Prober
from controlplane.state import ControlState

log = logging.getLogger(__name__)


async def publish(node: Node, observations: list[Observation]) -> None:
    """Write observations to the store; raises `StoreError` so the prober retries."""
    if not observations:
        return
    await node.store.publish_observations(node.agent_id, observations)
    node.metrics.observations_published.inc(len(observations))


async def refresh_loop(node: Node, prober: Prober, period_s: float) -> None:
    """Republish every current observation so it stays fresh in the store."""
    warned = False
    while True:
        await asyncio.sleep(period_s)
        try:
            await publish(node, prober.current())
            warned = False
        except StoreError as e:
            if not warned:
                log.warning("cannot refresh observations: %s (will keep trying)", e)
                warned = True


def ready_to_decide(node: Node, state: ControlState) -> bool:
    """The first decision waits until the observers have had their say on every pair.

    Without this, a leader elected at bootstrap would publish base weights for a region
    whose backends are already down, before a quorum of observers could say so. Every
    (service, region) needs fresh observations from a quorum of the live observers, and
    those must be a majority of the agents. A pair nobody can judge does not block the
    cluster forever: after `observation_ttl_s` (at least 10 s) the leader decides anyway.
    """
    if not state.epoch:
        return False  # the store has not created the cluster state yet
    if state.decision is not None:
        return True
    now = node.cluster_now()
    if now is None:
        return False
    policy = node.settings.policy
    fresh = [o for o in state.observations.values() if is_fresh(o, policy, now)]
    observers = {o.observer for o in fresh}
    if len(observers) <= len(node.settings.cluster.agents) // 2:
        return False
    judged = Counter((o.service, o.region) for o in fresh)
    needed = quorum_for(policy, len(observers))
    if all(judged[(s, r.name)] >= needed for s in policy.services for r in policy.regions_of(s)):
        return True
    return time.monotonic() - node.started_mono > max(10.0, policy.observation_ttl_s)


async def decide_once(node: Node, state: ControlState) -> Decision | None:
    """On the leader, decide from `state` and commit if anything changed."""
    status = node.store.status()
    if not status.is_leader or not status.has_quorum or not ready_to_decide(node, state):
        return None
    now = node.cluster_now()
    if now is None:
        return None
    ended = expired(state.intents, now)
    if ended:
        # The removal is the change; the decision follows from the state it leaves.
        await expire_intents(node, ended)
        return None
    decision = decide(
        node.settings.policy,
        state.observations.values(),
        state.intents,
        state.decision,
        now,
        intent_seq=state.intent_seq,
    )
    if decision is state.decision:
        return None
    stamped = replace(decision, term=status.term, leader=node.agent_id, committed_at=now, epoch=state.epoch)
    try:
        committed = await node.store.commit_decision(stamped)
    except (Conflict, NotLeader) as e:
        node.metrics.commit_errors.labels(type(e).__name__.lower()).inc()
        log.debug("decision %d not committed: %s", stamped.revision, e)
        return None
    except StoreError as e:
        node.metrics.commit_errors.labels("unavailable").inc()
        log.warning("decision %d not committed: %s", stamped.revision, e)
        return None
    node.metrics.decisions_committed.inc()
    log.info(
        "committed decision %d (term %d): %s",
        committed.revision,
        committed.term,
        "; ".join(committed.reasons) or "all regions serving",
    )
    return committed


async def expire_intents(node: Node, ended: list[Intent]) -> None:
    """Remove intents whose time is up, as an operator would (`who` "expiry")."""
    for intent in ended:
        assert intent.expires_at is not None
        reason = f"its time ran out at {iso_time(intent.expires_at)}"
        try:
            await node.store.delete_intent(intent.id, who="expiry", reason=reason)
        except NotFound:
            continue  # removed meanwhile by an operator
        except (Conflict, NotLeader) as e:
            log.debug("expiry of intent %s not committed: %s", intent.id, e)
            return
        except StoreError as e:
            log.warning("expiry of intent %s not committed: %s", intent.id, e)
            return
        log.info("intent %s expired: %s", intent.id, intent.describe())


async def decide_loop(node: Node, tick_s: float) -> None:
    version = -1
    while True:
        state = await node.store.wait_for_change(version, timeout_s=tick_s)
        version = state.version
        await decide_once(node, state)


def failover_stages(
    previous: Decision | None, current: Decision, state: ControlState, applied_at: float
) -> dict[str, float]:
    """How long a newly taken-out region took to be agreed and to reach this agent.

    Measured from the earliest fresh observation that reported the pair down; only for
    pairs that went from serving to down in `current`.
    """
    if previous is None:
        return {}
    started: list[float] = []
    for service, placements in current.services.items():
        for region, p in placements.items():
            before = previous.services.get(service, {}).get(region)
            if p.state != State.DOWN or before is None or before.state == State.DOWN:
                continue
            downs = [
                o.at
                for o in state.observations.values()
                if o.region == region and o.service == service and not o.up
            ]
            if downs:
                started.append(min(downs))
    if not started:
        return {}
    first = min(started)
    return {"verdict_committed": current.committed_at - first, "published": applied_at - first}


async def watch_loop(node: Node, tick_s: float) -> None:
    """Keep metrics in step with the decision this agent serves and its view of the group."""
    version = -1
    served: Decision | None = None
    while True:
        state = await node.store.wait_for_change(version, timeout_s=tick_s)
        version = state.version
        node.metrics.observe_status(node.store.status())
        decision = state.decision
        if decision is not None and (served is None or decision.revision != served.revision):
            node.metrics.observe_decision(decision)
            now = node.cluster_now()
            if now is not None:
                node.metrics.observe_stages(failover_stages(served, decision, state, now))
            if served is not None and decision.revision > served.revision + 1:
                log.info("caught up from revision %d to %d", served.revision, decision.revision)
            served = decision
