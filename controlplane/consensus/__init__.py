"""The replicated control state: one interface (`ControlStore`), several backends.

The agent depends on `ControlStore` and the value types here only; which backend it
runs is configuration. `RaftStore` is the embedded backend (the agents are the Raft group);
`EtcdStore` keeps the state in an existing etcd v3 cluster.
"""

from controlplane.consensus.base import (
    HISTORY_LIMIT,
    ControlState,
    ControlStore,
    HistoryEntry,
    MemberStatus,
    ObservationKey,
    StoreStatus,
    history_add,
    observations_replace,
)
from controlplane.consensus.etcd import EtcdStore
from controlplane.consensus.raft import RaftStore, RaftTimings

__all__ = [
    "HISTORY_LIMIT",
    "ControlState",
    "ControlStore",
    "EtcdStore",
    "HistoryEntry",
    "MemberStatus",
    "ObservationKey",
    "RaftStore",
    "RaftTimings",
    "StoreStatus",
    "history_add",
    "observations_replace",
]
