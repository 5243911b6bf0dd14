"""A `Node` on the in-memory backend, for tests that need an agent without a cluster."""

from __future__ import annotations

from pathlib import Path

from controlplane.agent.node import Node, Tokens
from controlplane.config import load_settings
from controlplane.consensus.memory import MemoryStore
from controlplane.metrics import Metrics
from controlplane.testing.localcluster import DEMO_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def memory_node(config: Path | None = None, tokens: Tokens | None = None) -> Node:
    settings = load_settings(config or DEMO_CONFIG)
    store = MemoryStore("agent-east-1")
    return Node(
        settings=settings,
        agent_id=store.member_id,
        store=store,
        metrics=Metrics(store.member_id),
        tokens=tokens or Tokens(admin="admin"),
    )
