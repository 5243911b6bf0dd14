"""The etcd backend: an existing etcd v3 cluster holds the control state.

`EtcdStore` is one agent's handle. etcd does the consensus; this module turns etcd's
primitives (leases, transactions, watches) into the promises of `ControlStore`. The key
layout is in `etcd_view`, the lease and the election in `etcd_session`, the wire in
`etcd_client`.

- Liveness: each member holds a lease of `lease_ttl_s` seconds. Its member key and its
  observations live under it, so they vanish when the agent stops refreshing it (a crash,
  a partition). A clean `close()` resigns and deletes the member key but does not revoke
  the lease: the agent's observations outlive a quick restart by up to the TTL, as they
  outlive one with Raft, instead of vanishing and moving the observer quorum.
- Leadership: created in a create-if-absent transaction under the leader's lease; the
  leader key's create_revision is the term (see `etcd_session`).
- Fencing: `commit_decision` is one transaction that compares the leader key's
  create_revision with `decision.term` and the committed revision with
  `decision.revision - 1`, and writes the decision, its history entry, and the deletion
  of the entry `HISTORY_LIMIT` behind. A deposed member (its lease ran out while it was
  frozen or cut off) can therefore never commit, whatever it still believes; the local
  leadership check only saves the round trip.
- Intents are written by any member, in a transaction that compares the intent counter's
  mod_revision with the one the change was computed from (`apply_intent` on the standing
  intents): intent writes are serialised, and an id applies once, because a resubmitted
  id is found among the standing intents or in the intent history and returned as it was
  committed. A refusal is only final when made on a fresh read.
- Drill results are written by any member, in a transaction that compares the drill
  counter's mod_revision with the one the write was computed from, as intents are: an
  id is recorded once (a retry finds it among the kept drills and gets it back), and
  the drill `DRILLS_LIMIT` behind is deleted in the same transaction. No lease: they
  outlive every member, and every member's view reads them.
- Observations: one key per observer, replaced by compare-and-set on its mod_revision
  (so a publish is atomic whatever the number of pairs; etcd caps operations per
  transaction at 128 by default).
- Reads: a watch on the prefix feeds the local `EtcdView`; `state()` is its snapshot and
  never blocks. A write returns once the watch has delivered it here (or after
  `timeout_s`), so a member reads its own writes. When the watch fails or goes silent
  (progress is requested every heartbeat and must come within `timeout_s`), the member
  reads the whole prefix again and watches anew: neither etcd nor aetcd resumes a watch
  after etcd restarts.
- Static stability: while etcd is out of reach, `state()` keeps returning the last
  synchronised snapshot and `status().has_quorum` is False; nothing is guessed locally.
- Bounded: every call has a timeout, writes in flight and waiters are capped, history is
  bounded in etcd itself, and compare-and-set retries are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import orjson

from controlplane import transitions
from controlplane.consensus.base import Changes, ControlStore
from controlplane.consensus.etcd_client import (
    EtcdClient,
    EtcdTls,
    LeaseLost,
    TxnResult,
    create_revision_is,
    delete,
    get,
    get_prefix,
    missing,
    mod_revision_is,
    parse_endpoint,
    put,
    value_is,
)
from controlplane.consensus.etcd_session import Contact, Session
from controlplane.consensus.etcd_view import (
    DrillsRead,
    EtcdView,
    IntentsRead,
    Layout,
    decode_observations,
    drills_read_from,
    encode_decision,
    encode_drill,
    encode_history,
    encode_intent,
    encode_observations,
    intents_read_from,
)
from controlplane.errors import ConfigError, Conflict, NoQuorum, NotLeader, Rejected, StoreError
from controlplane.model import Decision, Intent, Observation, decision_from_json
from controlplane.raft.clock import ClusterClock
from controlplane.state import (
    DRILLS_LIMIT,
    HISTORY_LIMIT,
    ControlState,
    DrillRecord,
    HistoryEntry,
    MemberStatus,
    StoreStatus,
)
from controlplane.tasks import spawn

log = logging.getLogger(__name__)

BACKEND = "etcd"

# Compare-and-set attempts before a write gives up. A member never races itself (its
# writes of one kind are serialised); members that race each other back off for a
# random moment after each loss, so that they do not collide again in lockstep.
_CAS_ATTEMPTS = 32
_CAS_BACKOFF_S = 0.002
_CAS_BACKOFF_MAX_S = 0.05
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 1.0
_HEARTBEAT_MAX_S = 1.0
# How often the leader writes the cluster's clock, and how soon after it starts leading.
_CLOCK_PERIOD_S = 1.0
_CLOCK_CHECK_S = 0.05

T = TypeVar("T")


class EtcdStore(ControlStore):
    """One agent's member of a deployment whose state lives in etcd (see the module docstring).

    `members` maps the configured member ids to the address shown for them in `status()`
    (the agents' HTTP addresses); members alive but not configured are shown too. A store
    is started once and closed once; a restart is a new `EtcdStore`.
    """

    def __init__(
        self,
        *,
        member_id: str,
        endpoints: Sequence[str],
        prefix: str = "/controlplane",
        lease_ttl_s: int = 5,
        timeout_s: float = 3.0,
        members: Mapping[str, str] | None = None,
        address: str = "",
        tls: EtcdTls | None = None,
        username: str | None = None,
        password: str | None = None,
        heartbeat_s: float | None = None,
        max_in_flight: int = 1024,
        max_waiters: int = 100_000,
    ) -> None:
        path = "backend.etcd"
        problems: list[str] = []
        if not member_id:
            problems.append("agent id: must not be empty (got '')")
        if not endpoints:
            problems.append(f"{path}.endpoints: at least one is needed (got none)")
        for i, endpoint in enumerate(endpoints):
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                problems.append(f"{path}.endpoints[{i}]: {exc}")
        if not prefix.startswith("/") or prefix.rstrip("/") == "":
            problems.append(f"{path}.prefix: must start with / and name a directory (got {prefix!r})")
        if lease_ttl_s < 2:
            problems.append(f"{path}.lease_ttl_s: must be at least 2, etcd's minimum (got {lease_ttl_s})")
        if not timeout_s > 0:
            problems.append(f"{path}.timeout_s: must be positive (got {timeout_s})")
        if heartbeat_s is not None and not 0 < heartbeat_s < lease_ttl_s / 2:
            problems.append(
                f"{path}.heartbeat_s: must be positive and below lease_ttl_s / 2 (got {heartbeat_s})"
            )
        if (username is None) != (password is None):
            absent = "password" if password is None else "username"
            problems.append(f"{path}.{absent}: required with the other credential (got nothing)")
        if tls is not None:
            problems.extend(tls.problems(f"{path}.tls"))
        if problems:
            raise ConfigError(problems)

        self.member_id = member_id
        self.endpoints = tuple(endpoints)
        self.layout = Layout(prefix)
        self.lease_ttl_s = lease_ttl_s
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s or min(lease_ttl_s / 3, _HEARTBEAT_MAX_S)
        self.address = address
        self._configured = dict(members or {})
        self._max_in_flight = max_in_flight

        self._client = EtcdClient(
            self.endpoints, timeout_s=timeout_s, tls=tls, username=username, password=password
        )
        self._view = EtcdView(self.layout)
        self._contact = Contact(window_s=self.heartbeat_s + timeout_s)
        self._clock = ClusterClock()
        self._clock_seen = 0
        self._clock_skew_s: float | None = None
        self._session = Session(
            self._client,
            self.layout,
            self._contact,
            member_id=member_id,
            address=address,
            lease_ttl_s=lease_ttl_s,
            heartbeat_s=self.heartbeat_s,
        )
        self._started = False
        self._closed = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changes = Changes(max_waiters)
        self._revision_advanced = asyncio.Event()
        # One writer at a time per kind on this member, so it never loses a
        # compare-and-set to itself; members still race each other, boundedly.
        self._publishing = asyncio.Lock()
        self._intent_writing = asyncio.Lock()
        self._drill_writing = asyncio.Lock()
        self._in_flight = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Read the state, take a lease, then watch and heartbeat. `StoreError` if etcd
        cannot be reached within `timeout_s` per call (nothing is left running)."""
        if self._started:
            raise StoreError("this etcd store was already started; make a new one to restart")
        self._started = True
        try:
            await self._sync()
            await self._session.open()
            await self._init_epoch()
            self._contact.ok()
        except BaseException:
            await self.close()
            raise
        self._spawn("watch", self._watch_loop())
        self._spawn("session", self._session.run())
        self._spawn("clock", self._clock_loop())

    async def _init_epoch(self) -> None:
        """Create the state's epoch if this prefix has none (first member wins); wait to see it."""
        if self._view.state.epoch:
            return
        keys = self.layout
        epoch, at = transitions.new_epoch(), time.time()
        # Not `_txn`: the watch that would show it here does not run yet; read it back instead.
        await self._client.txn(
            [missing(keys.epoch)],
            [
                put(keys.epoch, epoch.encode()),
                put(keys.epoch_history, encode_history(transitions.epoch_entry(epoch, at))),
            ],
            [],
        )
        await self._sync()

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[name] = spawn(f"etcd {name} of {self.member_id}", work, self.on_task_failure)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._session.leave()
        except StoreError as exc:
            log.info("etcd member %s: could not say goodbye (%s); its lease will expire", self.member_id, exc)
        await self._client.close()
        self._contact.closed = True
        self._contact.has_quorum()
        self._wake(state=True)

    # -- reads ---------------------------------------------------------------------------

    def state(self) -> ControlState:
        return self._view.state

    def status(self) -> StoreStatus:
        has_quorum = self._contact.has_quorum()
        session = self._session
        leader_kv = None if self._closed else self._view.leader
        if leader_kv is not None:
            session.last_term = max(session.last_term, leader_kv.create_revision)
        is_leader = (
            has_quorum
            and session.term != 0
            and leader_kv is not None
            and leader_kv.create_revision == session.term
            and session.lease_fresh()
        )
        live = {} if self._closed else self._view.members()
        addresses = dict(self._configured)
        for member_id, address in live.items():
            addresses.setdefault(member_id, address)
        return StoreStatus(
            member_id=self.member_id,
            leader=leader_kv.value.decode("utf-8", errors="replace") if leader_kv is not None else None,
            is_leader=is_leader,
            term=leader_kv.create_revision if leader_kv is not None else session.last_term,
            commit_index=self._view.revision,
            members=tuple(
                MemberStatus(id=m, address=live.get(m) or address, connected=m in live)
                for m, address in addresses.items()
            ),
            has_quorum=has_quorum,
            quorum_lost_at=self._contact.lost_at,
            backend=BACKEND,
            clock_skew_s=0.0 if is_leader else self._clock_skew_s,
        )

    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        return await self._changes.wait(
            lambda: self._view.state, after_version, timeout_s, lambda: self._closed
        )

    def _wake(self, *, state: bool) -> None:
        advanced, self._revision_advanced = self._revision_advanced, asyncio.Event()
        advanced.set()
        if state:
            self._changes.notify()

    async def _applied_here(self, revision: int) -> None:
        """Wait (at most `timeout_s`) until the watch has delivered `revision` here."""
        try:
            async with asyncio.timeout(self.timeout_s):
                while self._view.applied_revision < revision and not self._closed:
                    await self._revision_advanced.wait()
        except TimeoutError:
            log.info(
                "etcd member %s: its write at revision %d is not seen here yet", self.member_id, revision
            )

    # -- the watch -----------------------------------------------------------------------

    async def _sync(self) -> None:
        """Replace the local view with one read of the whole prefix."""
        revision, kvs = await self._client.range_prefix(self.layout.root)
        self._applied(self._view.reset(kvs, revision))

    async def _watch_loop(self) -> None:
        backoff = _RETRY_MIN_S
        needs_sync = False
        while True:
            try:
                if needs_sync:
                    await self._sync()
                    needs_sync = False
                await self._follow()
            except StoreError as exc:
                level = logging.WARNING if self._contact.watch_live else logging.DEBUG
                log.log(
                    level, "etcd member %s: watch lost (%s); will read everything again", self.member_id, exc
                )
            except Exception:
                log.exception("etcd member %s: watch failed; will read everything again", self.member_id)
            if self._contact.watch_live:
                backoff = _RETRY_MIN_S
            self._contact.watching(False)
            needs_sync = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX_S)

    async def _follow(self) -> None:
        """Apply watch responses until the stream fails or goes silent (then raise)."""
        async with self._client.watch(self.layout.root, self._view.applied_revision + 1) as watch:
            self._contact.watching(True)
            heard = asked = time.monotonic()
            while True:
                if time.monotonic() - asked >= self.heartbeat_s:
                    watch.request_progress()
                    asked = time.monotonic()
                try:
                    async with asyncio.timeout(self.heartbeat_s):
                        batch = await watch.next()
                except TimeoutError:
                    if time.monotonic() - heard > self.heartbeat_s + self.timeout_s:
                        raise NoQuorum("the etcd watch went silent") from None
                    continue
                heard = time.monotonic()
                self._applied(self._view.apply(batch))

    def _applied(self, state_changed: bool) -> None:
        self._session.seen_leader(self._view.leader, self._view.applied_revision)
        clock = self._view.clock
        if clock is not None and clock[0] != self._clock_seen:
            self._clock_seen = clock[0]
            _, ctime, wall = clock
            self._clock.observe_leader(ctime, time.monotonic())
            self._clock_skew_s = None if self._session.term else wall - time.time()
        self._wake(state=state_changed)

    # -- the cluster clock ----------------------------------------------------------------

    def cluster_time(self) -> float | None:
        return self._clock.now(time.monotonic())

    async def _clock_loop(self) -> None:
        """On the leader, write the cluster's clock every `_CLOCK_PERIOD_S`, fenced by its term."""
        keys = self.layout
        leading = 0
        next_write = 0.0
        while True:
            await asyncio.sleep(_CLOCK_CHECK_S)
            term = self._session.term
            if not term:
                leading = 0
                continue
            if term == leading and time.monotonic() < next_write:
                continue
            next_write = time.monotonic() + _CLOCK_PERIOD_S
            mono = time.monotonic()
            if term != leading:
                # A new leader continues from the clock it followed; only a new cluster seeds it.
                ctime = self._clock.become_leader(mono, time.time(), 0.0)
                leading = term
            else:
                ctime = self._clock.now(mono) or time.time()
            value = orjson.dumps({"ctime": ctime, "wall": time.time()})
            try:
                # No lease: the clock outlives every member, so after a full restart it resumes
                # from where it stopped instead of from a new leader's wall clock.
                await self._client.txn([create_revision_is(keys.leader, term)], [put(keys.clock, value)], [])
            except StoreError as exc:
                log.debug("etcd member %s: cluster clock not written: %s", self.member_id, exc)

    # -- writes --------------------------------------------------------------------------

    async def _write(self, work: Callable[[], Awaitable[T]]) -> T:
        if not self._started or self._closed:
            raise StoreError(f"etcd member {self.member_id} is not running")
        if self._in_flight >= self._max_in_flight:
            raise StoreError("too many writes in flight on this member", f"limit is {self._max_in_flight}")
        self._in_flight += 1
        try:
            return await work()
        except LeaseLost as exc:
            self._session.lease_lost()
            raise NoQuorum("this member's etcd lease expired; retry", exc.detail) from exc
        finally:
            self._in_flight -= 1

    async def _txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> TxnResult:
        """One transaction; if it wrote, wait until this member's view shows it."""
        result = await self._client.txn(compare, success, failure)
        self._contact.ok()
        if result.succeeded:
            await self._applied_here(result.revision)
        return result

    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        mine = [o for o in observations if o.observer == observer]
        if not mine:
            return

        # Stamped with this member's reading of the cluster's clock, not its wall clock.
        at = self.cluster_time()
        if at is None:
            raise NoQuorum("this member has not heard the cluster's clock yet; retry")

        async def work() -> None:
            key = self.layout.observer(observer)
            async with self._publishing:
                mod_revision, current = self._view.observer(observer)
                for attempt in range(_CAS_ATTEMPTS):
                    await _back_off(attempt)
                    if not self._session.lease:
                        raise NoQuorum("this member holds no etcd lease yet; retry")
                    merged = dict(current)
                    merged.update({(o.region, o.service): dataclasses.replace(o, at=at) for o in mine})
                    result = await self._txn(
                        [mod_revision_is(key, mod_revision)],
                        [put(key, encode_observations(merged), self._session.lease)],
                        [get(key)],
                    )
                    if result.succeeded:
                        return
                    fresh = result.first()
                    mod_revision, current = 0, {}
                    if fresh is not None:
                        mod_revision = fresh.mod_revision
                        # Unreadable (written by something else): replaced by this write.
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            current = decode_observations(observer, fresh.value)
                raise StoreError(f"observations of {observer} kept changing; not written")

        await self._write(work)

    async def submit_intent(self, intent: Intent) -> Intent:
        def plan(read: IntentsRead) -> Intent | _IntentChange:
            change = transitions.submit_intent(read.as_state(), intent, time.time())
            if change.entry is None:
                return change.result  # applied before (a retry): applied once
            committed, standing = change.result, change.state.intents
            ops = [delete(self.layout.intent(i)) for i in read.intents if i not in standing]
            if committed.id in standing:
                ops.append(put(self.layout.intent(committed.id), encode_intent(committed)))
            return _IntentChange(committed, ops, change.entry, logged=committed)

        return await self._write(lambda: self._change_intents(plan))

    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        def plan(read: IntentsRead) -> Intent | _IntentChange:
            change = transitions.delete_intent(read.as_state(), intent_id, who, reason, time.time())
            if change.entry is None:
                return change.result  # removed before (a retry): answered as then
            ops = [delete(self.layout.intent(intent_id))]
            return _IntentChange(change.result, ops, change.entry, logged=None)

        return await self._write(lambda: self._change_intents(plan))

    async def _change_intents(self, plan: Callable[[IntentsRead], Intent | _IntentChange]) -> Intent:
        """Commit what `plan` makes of the current intents, compare-and-set on the counter.

        `plan` runs first on the local view; a refusal (`Rejected`) is only final when it
        was made on a fresh read, and a lost compare-and-set retries on the fresh read
        that the failed transaction returned.
        """
        keys = self.layout
        async with self._intent_writing:
            read, fresh = self._view.intents_read(), False
            for attempt in range(_CAS_ATTEMPTS):
                await _back_off(attempt)
                try:
                    change = plan(read)
                except Rejected:
                    if fresh:
                        raise
                    read, fresh = await self._read_intents(), True
                    continue
                if isinstance(change, Intent):
                    return change
                seq = read.seq + 1
                success = [
                    *change.ops,
                    put(keys.intent_seq, str(seq).encode()),
                    put(keys.intent_entry(seq), encode_history(change.entry, change.logged)),
                    delete(keys.intent_entry(seq - HISTORY_LIMIT)),
                ]
                result = await self._txn(
                    [mod_revision_is(keys.intent_seq, read.seq_mod_revision)], success, self._intents_ops()
                )
                if result.succeeded:
                    return change.result
                read, fresh = self._intents_read_from(result), True
        raise StoreError(
            "intents kept changing under this write; nothing was changed", "retry with the same id"
        )

    def _intents_ops(self) -> list[Any]:
        keys = self.layout
        return [
            get_prefix(keys.intents),
            get(keys.intent_seq),
            get_prefix(keys.intent_history),
            get(keys.decision),
        ]

    async def _read_intents(self) -> IntentsRead:
        result = await self._client.txn([], self._intents_ops())
        self._contact.ok()
        return self._intents_read_from(result)

    def _intents_read_from(self, result: TxnResult) -> IntentsRead:
        intents, seq, history, decision_kvs = result.ranges
        decision = self._view.intents_read().decision
        if decision_kvs:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                decision = decision_from_json(orjson.loads(decision_kvs[0].value))
        return intents_read_from(intents, seq, history, decision)

    async def record_drill(self, record: DrillRecord) -> DrillRecord:
        # Stamped with this member's reading of the cluster's clock (its wall clock before
        # it heard one): what the record says, never what a rule compares.
        now = self.cluster_time()
        at = now if now is not None else time.time()
        keys = self.layout

        async def work() -> DrillRecord:
            async with self._drill_writing:
                read = self._view.drills_read()
                for attempt in range(_CAS_ATTEMPTS):
                    await _back_off(attempt)
                    # A refusal does not depend on the state: it is final on any read.
                    change = transitions.record_drill(read.as_state(), record, at)
                    if change.entry is None:
                        return change.result  # recorded before (a retry): recorded once
                    seq = read.seq + 1
                    success = [
                        put(keys.drill(seq), encode_drill(change.result)),
                        put(keys.drill_seq, str(seq).encode()),
                        put(keys.drill_entry(seq), encode_history(change.entry)),
                        delete(keys.drill(seq - DRILLS_LIMIT)),
                        delete(keys.drill_entry(seq - DRILLS_LIMIT)),
                    ]
                    result = await self._txn(
                        [mod_revision_is(keys.drill_seq, read.seq_mod_revision)],
                        success,
                        [get_prefix(keys.drills), get(keys.drill_seq)],
                    )
                    if result.succeeded:
                        return change.result
                    read = self._drills_read_from(result, read)
            raise StoreError(
                "drills kept changing under this write; nothing was recorded", "retry with the same id"
            )

        return await self._write(work)

    @staticmethod
    def _drills_read_from(result: TxnResult, before: DrillsRead) -> DrillsRead:
        drills, seq = result.ranges
        return drills_read_from(drills, seq, before.decision)

    async def commit_decision(self, decision: Decision) -> Decision:
        # Local check first: it saves a round trip, it is not what keeps a deposed leader
        # out (the transaction below is).
        term = self._session.term
        if not term:
            raise NotLeader(f"{self.member_id} is not the leader", leader=self.status().leader)
        if term != decision.term:
            raise NotLeader(
                f"{self.member_id} leads in term {term}, not in term {decision.term}",
                leader=self.member_id,
            )
        if decision.revision < 1:
            raise Conflict(f"revision {decision.revision} is not the next revision", "revisions start at 1")

        async def work() -> Decision:
            keys = self.layout
            previous = str(decision.revision - 1).encode()
            first = self._view.state.decision is None
            # etcd's transaction below is the compare-and-set; the entry is the shared one.
            entry = transitions.decision_entry(decision)
            success = [
                put(keys.decision, encode_decision(decision)),
                put(keys.decision_revision, str(decision.revision).encode()),
                put(keys.decision_entry(decision.revision), encode_history(entry)),
                delete(keys.decision_entry(decision.revision - HISTORY_LIMIT)),
            ]
            for _ in range(2):
                revision_guard = (
                    missing(keys.decision_revision) if first else value_is(keys.decision_revision, previous)
                )
                result = await self._txn(
                    [
                        create_revision_is(keys.leader, decision.term),
                        revision_guard,
                        value_is(keys.epoch, decision.epoch.encode()),
                    ],
                    success,
                    [get(keys.leader), get(keys.decision_revision), get(keys.epoch)],
                )
                if result.succeeded:
                    return decision
                leader, committed = result.first(0), result.first(1)
                if leader is None or leader.create_revision != decision.term:
                    if self._session.term == decision.term:
                        self._session.deposed()
                    holder = leader.value.decode("utf-8", errors="replace") if leader is not None else None
                    now = (
                        "no leader" if leader is None else f"{holder} leads in term {leader.create_revision}"
                    )
                    raise NotLeader(
                        f"etcd refused the decision: term {decision.term} is over ({now})", leader=holder
                    )
                epoch = result.first(2)
                if epoch is None or epoch.value != decision.epoch.encode():
                    found = epoch.value.decode("ascii", errors="replace") if epoch is not None else "(none)"
                    raise Conflict(
                        f"decision of epoch {decision.epoch or '(none)'} refused",
                        f"the cluster state under this prefix is epoch {found}",
                    )
                # The local view guessed wrong about whether a decision exists: retry once
                # with the right guard if the revision really is the next one.
                if committed is None:
                    first = True
                    continue
                if committed.value == previous:
                    first = False
                    continue
                raise Conflict(
                    f"revision {decision.revision} is not the next revision",
                    f"committed revision is {committed.value.decode('ascii', errors='replace')}",
                )
            raise Conflict(
                f"revision {decision.revision} could not be committed", "the committed revision moved"
            )

        return await self._write(work)


async def _back_off(attempt: int) -> None:
    """Nothing before a first attempt; a random, growing pause before each retry."""
    if attempt:
        await asyncio.sleep(random.uniform(0, min(_CAS_BACKOFF_MAX_S, _CAS_BACKOFF_S * 2**attempt)))


@dataclasses.dataclass(frozen=True, slots=True)
class _IntentChange:
    """One intent write: what to return, the extra operations, and its history entry."""

    result: Intent
    ops: list[Any]
    entry: HistoryEntry
    logged: Intent | None  # the applied intent, kept in its history entry for retries
