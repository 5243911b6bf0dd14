"""An in-process `ControlStore` with real behaviour, for tests that need a Node without a cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from controlplane.agent.node import Node, Tokens
from controlplane.config import load_settings
from controlplane.consensus.base import (
    ControlState,
    ControlStore,
    HistoryEntry,
    MemberStatus,
    StoreStatus,
    history_add,
    observations_replace,
)
from controlplane.errors import Conflict
from controlplane.intents import apply_intent, remove_intent
from controlplane.metrics import Metrics
from controlplane.model import Decision, Intent, Observation

ROOT = Path(__file__).resolve().parents[2]


class MemoryStore(ControlStore):
    """One member that is always the leader of term 1; every write applies at once."""

    def __init__(self, member_id: str = "agent-east-1") -> None:
        self.member_id = member_id
        self._state = ControlState()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def state(self) -> ControlState:
        return self._state

    def status(self) -> StoreStatus:
        return StoreStatus(
            member_id=self.member_id,
            leader=self.member_id,
            is_leader=True,
            term=1,
            commit_index=self._state.version,
            members=(MemberStatus(self.member_id, "memory", True),),
            has_quorum=True,
            backend="memory",
        )

    def _set(self, state: ControlState) -> None:
        self._state = replace(state, version=self._state.version + 1)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        if self._state.version > after_version:
            return self._state
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self._state

    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        self._set(
            replace(
                self._state,
                observations=observations_replace(self._state.observations, observer, observations),
            )
        )

    async def submit_intent(self, intent: Intent) -> Intent:
        seq = self._state.intent_seq + 1
        committed = replace(intent, seq=seq)
        intents = apply_intent(self._state.intents, committed)
        entry = HistoryEntry("intent", intent.created_at, 0, intent.describe(), intent.id, intent.who)
        self._set(
            replace(
                self._state, intents=intents, intent_seq=seq, history=history_add(self._state.history, entry)
            )
        )
        return committed

    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        removed = self._state.intents.get(intent_id)
        intents = remove_intent(self._state.intents, intent_id)
        assert removed is not None
        self._set(replace(self._state, intents=intents, intent_seq=self._state.intent_seq + 1))
        return removed

    async def commit_decision(self, decision: Decision) -> Decision:
        current = self._state.decision
        if decision.revision != (current.revision + 1 if current else decision.revision):
            raise Conflict(f"revision {decision.revision} is not next")
        self._set(replace(self._state, decision=decision))
        return decision


def memory_node(config: Path | None = None, tokens: Tokens | None = None) -> Node:
    settings = load_settings(config or ROOT / "config" / "demo.yaml")
    store = MemoryStore()
    return Node(
        settings=settings,
        agent_id=store.member_id,
        store=store,
        metrics=Metrics(store.member_id),
        tokens=tokens or Tokens(admin="admin"),
    )
