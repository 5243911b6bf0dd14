"""Build the configured backend's store from settings: the one place that knows them all.

The agent asks for "the store" and gets a `ControlStore`; which backend it is, and how
its settings and secrets are read, is decided here and nowhere else. Secrets are
resolved here (from the environment or a file, never the YAML), and every problem is
reported at once as a `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.config import EtcdConfig, Settings
from controlplane.consensus.base import ControlStore
from controlplane.errors import ConfigError

if TYPE_CHECKING:
    from controlplane.consensus.raft import RaftTimings


def make_store(settings: Settings, agent_id: str, data_dir: Path) -> ControlStore:
    """The store of `backend.kind` for agent `agent_id`, keeping its files under `data_dir`."""
    backend = settings.model.backend
    if backend.kind == "etcd":
        if backend.etcd is None:
            raise ConfigError(["backend.etcd: required when backend.kind is etcd (got nothing)"])
        return _etcd_store(settings, backend.etcd, agent_id)
    return _raft_store(settings, agent_id, data_dir)


def store_problems(settings: Settings) -> list[str]:
    """What the configured backend would refuse at start, found without starting it.

    `check-config` and the agent both ask (see `daemon.preflight`), so a file the
    systemd pre-start check passes is a file the agent starts with.
    """
    if settings.model.backend.kind == "raft":
        return _raft_timings(settings).problems()
    return []


def _raft_timings(settings: Settings) -> RaftTimings:
    from controlplane.consensus.raft import RaftTimings

    raft = settings.model.backend.raft
    return RaftTimings(
        election_timeout_min_s=raft.election_timeout_min_s,
        election_timeout_max_s=raft.election_timeout_max_s,
        heartbeat_s=raft.heartbeat_s,
        commit_timeout_s=raft.commit_timeout_s,
        fresh_window_s=raft.fresh_window_s,
        snapshot_entries=raft.snapshot_entries,
    )


def _raft_store(settings: Settings, agent_id: str, data_dir: Path) -> ControlStore:
    from controlplane.consensus.raft import RaftStore

    secret = settings.cluster.secret.resolve("cluster.secret")
    return RaftStore(
        member_id=agent_id,
        members={a.id: a.raft for a in settings.cluster.agents},
        secret=secret,
        data_dir=data_dir / "raft",
        timings=_raft_timings(settings),
        dial=dict(settings.cluster.dial) or None,
    )


def _etcd_store(settings: Settings, etcd: EtcdConfig, agent_id: str) -> ControlStore:
    from controlplane.consensus.etcd import EtcdStore
    from controlplane.consensus.etcd_client import EtcdTls

    problems: list[str] = []
    password: str | None = None
    if etcd.password is not None:
        try:
            password = etcd.password.resolve("backend.etcd.password", strong=False)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if etcd.username is not None and etcd.password is None:
        problems.append("backend.etcd.password: required when backend.etcd.username is set (got nothing)")
    if etcd.password is not None and etcd.username is None:
        problems.append("backend.etcd.username: required when backend.etcd.password is set (got nothing)")
    # Credentials only as a pair; a missing half is reported above, not twice.
    username = etcd.username if password is not None else None
    tls = None
    if etcd.tls is not None:
        tls = EtcdTls(ca_file=etcd.tls.ca_file, cert_file=etcd.tls.cert_file, key_file=etcd.tls.key_file)
    agents = settings.cluster.agents
    me = next((a for a in agents if a.id == agent_id), None)
    if me is None:
        known = ", ".join(a.id for a in agents)
        problems.append(f"agent id: {agent_id!r} is not in cluster.agents (known: {known})")
    store: ControlStore | None = None
    try:
        store = EtcdStore(
            member_id=agent_id,
            endpoints=etcd.endpoints,
            prefix=etcd.prefix,
            lease_ttl_s=etcd.lease_ttl_s,
            timeout_s=etcd.timeout_s,
            members={a.id: a.http for a in agents},
            address=me.http if me is not None else "",
            tls=tls,
            username=username,
            password=password if username is not None else None,
        )
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or store is None:
        raise ConfigError(problems)
    return store
