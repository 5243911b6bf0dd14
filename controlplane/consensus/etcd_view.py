"""The etcd backend's key layout, and the local copy of those keys that `state()` shows.

Everything lives under one prefix `P` (`backend.etcd.prefix`, `/controlplane` by default):

=============================  =================================================================
`P/leader`                     the leader's member id, under the leader's lease; its
                               create_revision is the term (the fencing token)
`P/members/{id}`               `{"id", "address"}` under the member's lease: it is alive
`P/decision/value`             the committed decision (JSON, `decision_to_json`)
`P/decision/revision`          that decision's revision in ASCII: what commits compare
`P/clock`                      `{"ctime", "wall"}`: the cluster's clock, written by the leader
                               every second (fenced by its term, no lease: it outlives every
                               member); members extrapolate it with their monotonic clocks
`P/epoch`                      the state's epoch in ASCII: created once, by the first member
                               to start on an empty prefix (create-if-absent), with its
                               history entry `P/history/e/epoch`; every commit compares it
`P/intents/{id}`               one standing intent (JSON, `intent_to_json`, with its seq)
`P/intent-seq`                 the last intent sequence number in ASCII; every intent write
                               compares its mod_revision, so intent writes are serialised
`P/history/d/{revision:020}`   the history entry of a committed decision
`P/history/i/{seq:020}`        the history entry of an intent or an intent removal; an
                               applied intent's entry carries the committed intent, which is
                               how a resubmitted id is recognised
`P/observations/{observer}`    all of one observer's latest observations (JSON), under the
                               lease of the member that published them
`P/drills/{seq:020}`           one recorded drill result (JSON, `drill_to_json`); no lease:
                               it outlives every member
`P/drill-seq`                  the last drill sequence number in ASCII; every drill write
                               compares its mod_revision, so drill writes are serialised and
                               an id is recorded once
`P/history/r/{seq:020}`        the history entry of a recorded drill
=============================  =================================================================

Ids in keys are percent-encoded, so an id with a `/` cannot escape its directory.

History keys are created once, in the transaction that commits what they record, so
ordering them by create_revision is ordering them by commit. Decision entries and intent
entries are each bounded to `HISTORY_LIMIT` (a commit deletes the entry `HISTORY_LIMIT`
behind it in the same transaction), and the snapshot shows the newest `HISTORY_LIMIT` of
both together: exactly what the Raft backend's single bounded list holds. Drill results
and their entries are bounded to `DRILLS_LIMIT` the same way (recording drill `seq`
deletes drill `seq - DRILLS_LIMIT` and its entry).

`EtcdView` applies whole watch responses (etcd never splits one revision across
responses), so a snapshot never shows half a transaction. It never raises on data it
cannot parse (a key written by something else under the prefix, or by a newer release):
it logs once and treats the key as absent.

`version` is the etcd revision of the last change to the control state: leader and
member keys do not count, since nothing in `ControlState` shows them. After a full
resynchronisation the version stays put when the state is unchanged and otherwise
becomes the revision read; on the first synchronisation it is the highest mod_revision
among the state keys, so a member that restarts shows the same version for the same
state. (A deletion by lease expiry leaves no mod_revision behind, so two members may show
different versions for the same state until the next change; versions are only ever
compared on one member.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from controlplane.consensus.etcd_client import KeyValue, WatchBatch
from controlplane.model import (
    Decision,
    Intent,
    Observation,
    decision_from_json,
    decision_to_json,
    intent_from_json,
    intent_to_json,
    observation_from_json,
    observation_to_json,
)
from controlplane.state import (
    DRILLS_LIMIT,
    HISTORY_LIMIT,
    ControlState,
    DrillRecord,
    HistoryEntry,
    ObservationKey,
    drill_from_json,
    drill_to_json,
    history_from_json,
    history_to_json,
)

log = logging.getLogger(__name__)


def _quote(part: str) -> bytes:
    return urllib.parse.quote(part, safe="").encode()


def _unquote(part: bytes) -> str:
    return urllib.parse.unquote(part.decode("utf-8", errors="replace"))


class Layout:
    """The keys of one deployment, all under `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.root = prefix.rstrip("/").encode() + b"/"
        self.leader = self.root + b"leader"
        self.members = self.root + b"members/"
        self.decision = self.root + b"decision/value"
        self.decision_revision = self.root + b"decision/revision"
        self.epoch = self.root + b"epoch"
        self.clock = self.root + b"clock"
        self.epoch_history = self.root + b"history/e/epoch"
        self.intents = self.root + b"intents/"
        self.intent_seq = self.root + b"intent-seq"
        self.history = self.root + b"history/"
        self.decision_history = self.root + b"history/d/"
        self.intent_history = self.root + b"history/i/"
        self.observations = self.root + b"observations/"
        self.drills = self.root + b"drills/"
        self.drill_seq = self.root + b"drill-seq"
        self.drill_history = self.root + b"history/r/"

    def member(self, member_id: str) -> bytes:
        return self.members + _quote(member_id)

    def intent(self, intent_id: str) -> bytes:
        return self.intents + _quote(intent_id)

    def decision_entry(self, revision: int) -> bytes:
        return self.decision_history + b"%020d" % revision

    def intent_entry(self, seq: int) -> bytes:
        return self.intent_history + b"%020d" % seq

    def observer(self, observer: str) -> bytes:
        return self.observations + _quote(observer)

    def drill(self, seq: int) -> bytes:
        return self.drills + b"%020d" % seq

    def drill_entry(self, seq: int) -> bytes:
        return self.drill_history + b"%020d" % seq

    def is_state_key(self, key: bytes) -> bool:
        """Whether `key` is shown by `ControlState` (leadership, liveness and the clock are not)."""
        return key not in (self.leader, self.clock) and not key.startswith(self.members)


# -- values ------------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def encode_decision(decision: Decision) -> bytes:
    return dumps(decision_to_json(decision))


def encode_intent(intent: Intent) -> bytes:
    return dumps(intent_to_json(intent))


def encode_history(entry: HistoryEntry, intent: Intent | None = None) -> bytes:
    data = history_to_json(entry)
    if intent is not None:
        data["intent"] = intent_to_json(intent)
    return dumps(data)


def encode_drill(record: DrillRecord) -> bytes:
    return dumps(drill_to_json(record))


def decode_drill(value: bytes) -> DrillRecord:
    return drill_from_json(orjson.loads(value))


def decode_history(value: bytes) -> tuple[HistoryEntry, Intent | None]:
    data = orjson.loads(value)
    entry = history_from_json(data)
    intent = intent_from_json(data["intent"]) if data.get("intent") is not None else None
    return entry, intent


ObserverMap = dict[tuple[str, str], Observation]  # (region, service) -> observation


def encode_observations(observations: ObserverMap) -> bytes:
    ordered = [observations[k] for k in sorted(observations)]
    return dumps({"observations": [observation_to_json(o) for o in ordered]})


def decode_observations(observer: str, value: bytes) -> ObserverMap:
    data = orjson.loads(value)
    out: ObserverMap = {}
    for item in data["observations"]:
        o = observation_from_json(item)
        if o.observer == observer:  # the key names the observer; nobody speaks for another
            out[(o.region, o.service)] = o
    return out


def decode_int(value: bytes) -> int:
    return int(value.decode("ascii"))


@dataclass(frozen=True, slots=True)
class IntentsRead:
    """What an intent write is decided on: read together, at one revision."""

    seq: int
    seq_mod_revision: int  # 0 when the counter does not exist yet
    intents: Mapping[str, Intent]
    applied: Mapping[str, Intent]  # intents applied within the history window, by id
    decision: Decision | None
    removals: tuple[HistoryEntry, ...] = ()  # intent removals within the history window

    def as_state(self) -> ControlState:
        """The part of the control state an intent command reads (`controlplane.transitions`)."""
        return ControlState(
            decision=self.decision,
            intents=self.intents,
            intent_seq=self.seq,
            recent_intents=self.applied,
            history=self.removals,
        )


def intents_read_from(
    intent_kvs: Iterable[KeyValue],
    seq_kvs: Iterable[KeyValue],
    history_kvs: Iterable[KeyValue],
    decision: Decision | None,
) -> IntentsRead:
    """An `IntentsRead` from fresh range results (undecodable keys are skipped)."""
    intents: dict[str, Intent] = {}
    for kv in intent_kvs:
        intent = _decode_or_none(kv, lambda v: intent_from_json(orjson.loads(v)))
        if intent is not None:
            intents[intent.id] = intent
    seq, seq_mod = 0, 0
    for kv in seq_kvs:
        value = _decode_or_none(kv, decode_int)
        if value is not None:
            seq, seq_mod = value, kv.mod_revision
    applied: dict[str, Intent] = {}
    removals: list[HistoryEntry] = []
    for kv in sorted(history_kvs, key=lambda kv: kv.create_revision):
        decoded = _decode_or_none(kv, decode_history)
        if decoded is not None and decoded[1] is not None:
            applied[decoded[1].id] = decoded[1]
        if decoded is not None and decoded[0].kind == "intent-removed":
            removals.append(decoded[0])
    return IntentsRead(seq, seq_mod, intents, applied, decision, tuple(removals))


@dataclass(frozen=True, slots=True)
class DrillsRead:
    """What a drill write is decided on: the kept drills and their counter, read together."""

    seq: int
    seq_mod_revision: int  # 0 when the counter does not exist yet
    drills: tuple[DrillRecord, ...]
    decision: Decision | None

    def as_state(self) -> ControlState:
        """The part of the control state `transitions.record_drill` reads."""
        return ControlState(decision=self.decision, drills=self.drills)


def drills_read_from(
    drill_kvs: Iterable[KeyValue], seq_kvs: Iterable[KeyValue], decision: Decision | None
) -> DrillsRead:
    """A `DrillsRead` from fresh range results (undecodable keys are skipped)."""
    drills = [_decode_or_none(kv, decode_drill) for kv in sorted(drill_kvs, key=lambda kv: kv.key)]
    seq, seq_mod = 0, 0
    for kv in seq_kvs:
        value = _decode_or_none(kv, decode_int)
        seq, seq_mod = (value if value is not None else 0), kv.mod_revision
    kept = tuple(d for d in drills if d is not None)[-DRILLS_LIMIT:]
    return DrillsRead(seq, seq_mod, kept, decision)


_warned: set[bytes] = set()


def _decode_or_none(kv: KeyValue, decode: Any) -> Any:
    try:
        return decode(kv.value)
    except Exception as exc:
        # Bounded: one warning per key for the life of the process, and only a few keys.
        if kv.key not in _warned and len(_warned) < 1000:
            _warned.add(kv.key)
            log.warning("ignoring undecodable etcd key %r: %r", kv.key, exc)
        return None


# -- the view ----------------------------------------------------------------------------


@dataclass(slots=True)
class _ObserverEntry:
    kv: KeyValue
    observations: ObserverMap


@dataclass(slots=True)
class _HistoryItem:
    entry: HistoryEntry
    intent: Intent | None


@dataclass(slots=True)
class _Areas:
    """The parsed keys, by area; rebuilt from scratch by `reset`, patched by `apply`."""

    epoch: str = ""
    decision: Decision | None = None
    intents: dict[bytes, Intent] = field(default_factory=dict)
    intent_seq: int = 0
    intent_seq_mod: int = 0
    # Insertion-ordered by create_revision: new history keys always come last.
    history: dict[bytes, _HistoryItem] = field(default_factory=dict)
    observers: dict[bytes, _ObserverEntry] = field(default_factory=dict)
    # Intents applied within the history window, by id: how a resubmission is recognised.
    applied: dict[str, Intent] = field(default_factory=dict)
    leader: KeyValue | None = None
    members: dict[bytes, KeyValue] = field(default_factory=dict)
    clock: KeyValue | None = None
    # Recorded drills by key (`P/drills/{seq:020}`: sorting the keys orders them by seq).
    drills: dict[bytes, DrillRecord] = field(default_factory=dict)
    drill_seq: int = 0
    drill_seq_mod: int = 0


class EtcdView:
    """The local copy of the keys under the prefix (see the module docstring).

    `applied_revision` is the revision everything up to which is applied (the sync's
    revision, then each watch response's); `progress_revision` is the highest revision
    etcd reported through progress notifications; `state` is the published snapshot.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.applied_revision = 0
        self.progress_revision = 0
        self.synced = False
        self.state = ControlState()
        self._areas = _Areas()

    # -- reads used by the store ---------------------------------------------------------

    @property
    def revision(self) -> int:
        return max(self.applied_revision, self.progress_revision)

    @property
    def leader(self) -> KeyValue | None:
        return self._areas.leader

    @property
    def clock(self) -> tuple[int, float, float] | None:
        """(mod_revision, cluster time, leader's wall time) of the last clock write seen."""
        kv = self._areas.clock
        if kv is None:
            return None
        try:
            data = orjson.loads(kv.value)
            return kv.mod_revision, float(data["ctime"]), float(data["wall"])
        except (ValueError, KeyError, TypeError):
            return None

    def members(self) -> dict[str, str]:
        """Live member id -> the address it announced."""
        out: dict[str, str] = {}
        for key, kv in self._areas.members.items():
            member_id = _unquote(key[len(self.layout.members) :])
            address = ""
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                address = str(orjson.loads(kv.value).get("address", ""))
            out[member_id] = address
        return out

    def observer(self, observer: str) -> tuple[int, ObserverMap]:
        """(mod_revision of the observer's key or 0, its observations)."""
        entry = self._areas.observers.get(self.layout.observer(observer))
        if entry is None:
            return 0, {}
        return entry.kv.mod_revision, dict(entry.observations)

    def intents_read(self) -> IntentsRead:
        a = self._areas
        removals = tuple(i.entry for i in a.history.values() if i.entry.kind == "intent-removed")
        intents, applied = dict(self.state.intents), dict(a.applied)
        return IntentsRead(a.intent_seq, a.intent_seq_mod, intents, applied, a.decision, removals)

    def drills_read(self) -> DrillsRead:
        a = self._areas
        return DrillsRead(a.drill_seq, a.drill_seq_mod, self.state.drills, a.decision)

    # -- changes -------------------------------------------------------------------------

    def reset(self, kvs: Iterable[KeyValue], revision: int) -> bool:
        """Replace everything with a full read at `revision`; True if the state changed."""
        areas = _Areas()
        highest_state_mod = 0
        for kv in sorted(kvs, key=lambda kv: kv.create_revision):
            self._put(areas, kv)
            if self.layout.is_state_key(kv.key):
                highest_state_mod = max(highest_state_mod, kv.mod_revision)
        self._areas = areas
        previous = self.state
        candidate = self._build(version=previous.version)
        self.applied_revision = revision
        self.progress_revision = max(self.progress_revision, revision)
        first = not self.synced
        self.synced = True
        if first:
            self.state = _with_version(candidate, highest_state_mod)
            return self.state != previous
        if _same_content(candidate, previous):
            return False
        self.state = _with_version(candidate, max(revision, previous.version + 1))
        return True

    def apply(self, batch: WatchBatch) -> bool:
        """Apply one watch response; True if the state changed. Old events are skipped."""
        if not batch.events:
            self.progress_revision = max(self.progress_revision, batch.revision)
            return False
        a = self._areas
        dirty: set[str] = set()
        newest = self.applied_revision
        for event in batch.events:
            kv = event.kv
            if kv.mod_revision <= self.applied_revision:
                continue
            newest = max(newest, kv.mod_revision)
            if event.deleted:
                dirty.add(self._delete(a, kv.key))
            else:
                dirty.add(self._put(a, kv))
        self.applied_revision = newest
        self.progress_revision = max(self.progress_revision, newest)
        dirty -= {"leader", "members", "clock", ""}
        if not dirty:
            return False
        previous = self.state
        self.state = self._build(
            version=max(newest, previous.version + 1),
            reuse=previous,
            dirty=dirty,
        )
        return True

    # -- internals -----------------------------------------------------------------------

    def _put(self, a: _Areas, kv: KeyValue) -> str:
        """Record one key; returns the area it belongs to ("" for none)."""
        keys = self.layout
        key = kv.key
        if key == keys.leader:
            a.leader = kv
            return "leader"
        if key == keys.clock:
            a.clock = kv
            return "clock"
        if key.startswith(keys.members):
            a.members[key] = kv
            return "members"
        if key == keys.decision:
            a.decision = _decode_or_none(kv, lambda v: decision_from_json(orjson.loads(v)))
            return "decision"
        if key == keys.decision_revision:
            return ""  # the compare target only; the decision carries its revision
        if key == keys.epoch:
            epoch = _decode_or_none(kv, lambda v: v.decode("ascii"))
            a.epoch = epoch or ""
            return "epoch"
        if key.startswith(keys.intents):
            intent = _decode_or_none(kv, lambda v: intent_from_json(orjson.loads(v)))
            if intent is None:
                a.intents.pop(key, None)
            else:
                a.intents[key] = intent
            return "intents"
        if key == keys.intent_seq:
            seq = _decode_or_none(kv, decode_int)
            # An unreadable counter keeps its mod_revision, so the next intent overwrites it.
            a.intent_seq, a.intent_seq_mod = (seq if seq is not None else 0), kv.mod_revision
            return "intents"
        if key.startswith(keys.history):
            self._forget_entry(a, key)
            decoded = _decode_or_none(kv, decode_history)
            if decoded is not None:
                item = a.history[key] = _HistoryItem(*decoded)
                if item.intent is not None:
                    a.applied[item.intent.id] = item.intent
            return "history"
        if key.startswith(keys.drills):
            record = _decode_or_none(kv, decode_drill)
            if record is None:
                a.drills.pop(key, None)
            else:
                a.drills[key] = record
            return "drills"
        if key == keys.drill_seq:
            seq = _decode_or_none(kv, decode_int)
            # An unreadable counter keeps its mod_revision, so the next drill overwrites it.
            a.drill_seq, a.drill_seq_mod = (seq if seq is not None else 0), kv.mod_revision
            return "drills"
        if key.startswith(keys.observations):
            observer = _unquote(key[len(keys.observations) :])
            observations = _decode_or_none(kv, lambda v: decode_observations(observer, v))
            if observations is None:
                a.observers.pop(key, None)
            else:
                a.observers[key] = _ObserverEntry(kv, observations)
            return "observations"
        return ""

    def _delete(self, a: _Areas, key: bytes) -> str:
        keys = self.layout
        if key == keys.leader:
            a.leader = None
            return "leader"
        if key == keys.clock:
            a.clock = None
            return "clock"
        if key.startswith(keys.members):
            a.members.pop(key, None)
            return "members"
        if key == keys.decision:
            a.decision = None
            return "decision"
        if key == keys.epoch:
            a.epoch = ""
            return "epoch"
        if key.startswith(keys.intents):
            a.intents.pop(key, None)
            return "intents"
        if key == keys.intent_seq:
            a.intent_seq, a.intent_seq_mod = 0, 0
            return "intents"
        if key.startswith(keys.history):
            self._forget_entry(a, key)
            return "history"
        if key.startswith(keys.observations):
            a.observers.pop(key, None)
            return "observations"
        if key.startswith(keys.drills):
            a.drills.pop(key, None)
            return "drills"
        if key == keys.drill_seq:
            a.drill_seq, a.drill_seq_mod = 0, 0
            return "drills"
        return ""

    @staticmethod
    def _forget_entry(a: _Areas, key: bytes) -> None:
        item = a.history.pop(key, None)
        if item is not None and item.intent is not None and a.applied.get(item.intent.id) is item.intent:
            del a.applied[item.intent.id]

    def _build(
        self, *, version: int, reuse: ControlState | None = None, dirty: set[str] | None = None
    ) -> ControlState:
        """A snapshot; with `reuse`, areas not in `dirty` are taken from it unchanged."""
        a = self._areas

        def rebuild(area: str) -> bool:
            return reuse is None or dirty is None or area in dirty

        intents: Mapping[str, Intent]
        observations: Mapping[ObservationKey, Observation]
        history: tuple[HistoryEntry, ...]
        drills: tuple[DrillRecord, ...]
        if rebuild("intents") or reuse is None:
            intents = MappingProxyType({i.id: i for i in a.intents.values()})
        else:
            intents = reuse.intents
        if rebuild("observations") or reuse is None:
            observations = MappingProxyType(
                {
                    (o.observer, o.region, o.service): o
                    for entry in a.observers.values()
                    for o in entry.observations.values()
                }
            )
        else:
            observations = reuse.observations
        if rebuild("history") or reuse is None:
            history = tuple(item.entry for item in list(a.history.values())[-HISTORY_LIMIT:])
        else:
            history = reuse.history
        if rebuild("drills") or reuse is None:
            drills = tuple(record for _, record in sorted(a.drills.items()))[-DRILLS_LIMIT:]
        else:
            drills = reuse.drills
        return ControlState(
            epoch=a.epoch,
            version=version,
            decision=a.decision,
            intents=intents,
            intent_seq=a.intent_seq,
            observations=observations,
            history=history,
            recent_intents=MappingProxyType(dict(a.applied)),
            drills=drills,
        )


def _with_version(state: ControlState, version: int) -> ControlState:
    return dataclasses.replace(state, version=version)


def _same_content(a: ControlState, b: ControlState) -> bool:
    return (
        a.epoch == b.epoch
        and a.decision == b.decision
        and dict(a.intents) == dict(b.intents)
        and a.intent_seq == b.intent_seq
        and dict(a.observations) == dict(b.observations)
        and a.history == b.history
        and a.drills == b.drills
    )
