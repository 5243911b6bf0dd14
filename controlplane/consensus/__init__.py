"""The replicated control state: one interface (`ControlStore`), several backends.

The agent depends on `ControlStore` and the value types of `controlplane.state` only;
which backend it runs is configuration (`factory.make_store`). `MemoryStore` keeps the
state in one process (tests, the in-process API tier); `RaftStore` is the embedded
backend (the agents are the Raft group); `EtcdStore` keeps the state in an existing
etcd v3 cluster.
"""

import importlib
from typing import TYPE_CHECKING, Any

from controlplane.consensus.base import ControlStore

if TYPE_CHECKING:
    from controlplane.consensus.etcd import EtcdStore
    from controlplane.consensus.memory import MemoryGroup, MemoryStore
    from controlplane.consensus.raft import RaftStore, RaftTimings

# The backends load on first use: an agent on Raft never pays for etcd's gRPC stack
# (13-21 MB of RSS, measured) and one on etcd never loads the Raft engine.
_LAZY = {
    "EtcdStore": "controlplane.consensus.etcd",
    "MemoryGroup": "controlplane.consensus.memory",
    "MemoryStore": "controlplane.consensus.memory",
    "RaftStore": "controlplane.consensus.raft",
    "RaftTimings": "controlplane.consensus.raft",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["ControlStore", "EtcdStore", "MemoryGroup", "MemoryStore", "RaftStore", "RaftTimings"]
