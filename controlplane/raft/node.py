"""`RaftNode`: the shell that runs the pure core with a journal and a transport.

The node runs on its OWN thread with its own asyncio event loop (a plain selector loop,
whatever loop policy the host process sets), so an overloaded application loop cannot
delay heartbeats, and a frozen engine is visible from outside: `status().ticked_at`
stops moving and `status().fresh` turns False within a second by itself.

Each Ready is handled in the order the core requires: persist (one fdatasync), then
send, then restore/apply, then answer reads, then `advance`. Messages and frames that
arrive in one event-loop turn are stepped together, so they share one fsync.

Thread-safety: `propose`, `read_index`, `status`, `cluster_time` and `stop` may be called
from any thread. The state machine's methods are called on the engine thread only
(`restore` and the journal replay also from `start()`'s caller, before the thread runs).

Guarantees:

- `start()` replays the journal up to the persisted commit index before anything else,
  and the commit index is durable before an entry is applied, so a restarted node never
  serves less than it applied before (unless its journal was damaged: then it reports
  `recovering` and is not fresh until it has caught up).
- `status().fresh` is True only while, within `fresh_window_s` and in the current term,
  this node confirmed that it had applied everything the leader had committed
  (followers: a ReadIndex round every `fresh_probe_s`; the leader: a quorum answered it
  within the window and it has applied its own commit index).
- A disk error while running (ENOSPC, EIO) is logged at ERROR once, then reminded every
  `disk_reminder_s`; the node steps down, stops acknowledging appends and granting votes
  (it drops Raft traffic), fails proposals at once with DiskFailedError, keeps its
  applied state readable, and retries the write every `disk_retry_s`; once it succeeds
  it carries on by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import random
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controlplane.raft import chunks, codec
from controlplane.raft.clock import ClusterClock
from controlplane.raft.core import ProposalRefused, RaftCore, Restored
from controlplane.raft.errors import (
    CommitTimeoutError,
    DiskFailedError,
    EntryTooLargeError,
    NoLeaderError,
    NotLeaderError,
    ProposalDroppedError,
    QueueFullError,
    RaftBindError,
    RaftConfigError,
    ReadTimeoutError,
    StoppedError,
)
from controlplane.raft.messages import Entry, EntryKind, Message, MsgType, Ready, Role, Snapshot
from controlplane.raft.quorum import quorum_size
from controlplane.raft.settings import RaftLimits, RaftTimings, core_config
from controlplane.raft.status import MemberStatus, Published, RaftStatus, StateMachine, is_fresh, status_of
from controlplane.raft.storage import Journal, Loaded
from controlplane.raft.transport import COUNTERS as TRANSPORT_COUNTERS
from controlplane.raft.transport import Transport, TransportConfig, split_host_port

log = logging.getLogger("controlplane.raft.node")

# Envelope kinds on the wire (the first element of the msgpack list).
_RAFT = 0
_PROP = 1
_PROP_RESP = 2
_SNAP_CHUNK = 3
# Results of applied entries, kept for forwarded proposals whose answer (the index the
# leader gave them) arrives after the entry was applied here: at most this many, and none
# older than a forward can wait (`forward_timeout_s`) plus a second. Results hold whole
# decisions (3-5 KB each): keeping 4096 of them cost an agent about 15 MB for nothing.
_RESULT_MEMORY = 4096
_RESULT_SLACK_S = 1.0
_TOKEN_MEMORY = 4096  # send-time tokens a leader keeps (one per batch sent; pruned by age too)


@dataclass(slots=True)
class _Pending:
    term: int
    future: concurrent.futures.Future[object]
    deadline: float


@dataclass(slots=True)
class _Forward:
    futures: list[concurrent.futures.Future[object]]
    deadline: float
    leader: str


@dataclass(slots=True)
class _Probe:
    sent_mono: float
    sent_wall: float
    term: int
    index: int | None = None


class RaftNode:
    def __init__(
        self,
        node_id: str,
        peers: Mapping[str, str],
        secret: bytes,
        data_dir: Path,
        state_machine: StateMachine,
        timings: RaftTimings | None = None,
        limits: RaftLimits | None = None,
        dial: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`peers` maps every member id (this node included) to its listening address;
        `dial` optionally overrides the address this node dials for some of them."""
        self.id = node_id
        self.timings = timings or RaftTimings()
        self.limits = limits or RaftLimits()
        problems = self.timings.problems() + self.limits.problems()
        if node_id not in peers:
            problems.append(f"backend.raft.peers: must include this node {node_id!r} (got {sorted(peers)})")
        for member, address in peers.items():
            try:
                split_host_port(address)
            except ValueError as exc:
                problems.append(f"backend.raft.peers.{member}: {exc}")
        if len(secret) < 16:
            problems.append(f"backend.raft.secret: must be at least 16 bytes (got {len(secret)})")
        if problems:
            raise RaftConfigError("; ".join(problems))
        self.peers = dict(peers)
        self.dial = {p: (dict(dial or {}).get(p) or a) for p, a in peers.items() if p != node_id}
        self._secret = secret
        self.data_dir = Path(data_dir)
        self.sm = state_machine
        self._rng = rng or random.Random()
        self._config = core_config(self.timings, self.limits)
        self._published = Published()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        # Engine-thread state (created in start()).
        self._core: RaftCore | None = None
        self._journal: Journal | None = None
        self._transport: Transport | None = None
        self._sock: socket.socket | None = None
        self._loaded: Loaded | None = None
        self._clock = ClusterClock()
        self._scheduled = False
        self._proposal_batch: list[tuple[bytes, concurrent.futures.Future[object]]] = []
        self._pending: dict[int, _Pending] = {}
        self._forwards: dict[int, _Forward] = {}
        self._reads: dict[bytes, tuple[concurrent.futures.Future[int], float]] = {}
        self._read_waits: list[tuple[int, concurrent.futures.Future[int], float]] = []
        self._probes: OrderedDict[bytes, _Probe] = OrderedDict()
        self._next_probe = 0.0
        self._fresh_until = 0.0
        self._results: OrderedDict[int, tuple[int, object, float]] = OrderedDict()  # (term, result, when)
        self._ids = itertools.count(1)
        # The leader's lease runs from when it *asked*, not from when an answer arrived: an
        # answer read late (the leader paused, its loop stalled, the answer delayed on the
        # way) proves only that the follower followed it when it sent what was answered
        # (chaos seed 168: a leader resumed from SIGSTOP served an old decision as fresh).
        # Every batch a leader sends carries its wall clock reading as a token (`wall`);
        # followers echo the last token of their leader in their answers; the leader maps
        # the token back to its monotonic clock. A follower of an older release echoes
        # nothing and its answers count when they arrive, as before.
        self._peer_acked: dict[str, float] = {}  # peer -> when (monotonic) the leader asked what it answered
        self._sent_tokens: OrderedDict[float, float] = OrderedDict()  # wall token -> monotonic send time
        self._leader_token: dict[str, float] = {}  # peer -> the last wall token it sent us as leader
        self._leader_heard = 0.0
        self._skew: float | None = None
        self._role = Role.FOLLOWER
        self._leader: str | None = None
        self._term = 0
        self._pending_ready: Ready | None = None
        self._disk_error: str | None = None
        self._disk_failed_at = 0.0
        self._disk_next_retry = 0.0
        self._disk_reminded = 0.0
        self._compact_after = 0.0
        self._assembler = chunks.Assembler(self.limits.max_snapshot_bytes)
        self._snap_senders: dict[str, asyncio.Task[None]] = {}
        self._next_timeout_check = 0.0
        self._applied_bytes = 0  # applied since the last snapshot, for the compaction threshold
        self.counters: dict[str, int] = {
            "proposals": 0,
            "proposals_forwarded": 0,
            "applied_entries": 0,
            "fsyncs": 0,
            "snapshots_taken": 0,
            "snapshots_sent": 0,
            "snapshots_installed": 0,
            "messages_dropped_disk": 0,
            "bad_messages": 0,
            "apply_errors": 0,
            "votes_granted": 0,
            "pre_votes_granted": 0,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load and replay the journal, bind the listener, start the engine thread."""
        if self._thread is not None:
            raise RuntimeError("already started")
        journal, loaded = Journal.open(self.data_dir)
        self._journal, self._loaded = journal, loaded
        applied = self._replay(loaded)
        restored = Restored(
            hard_state=loaded.hard_state,
            snapshot=loaded.snapshot,
            entries=loaded.entries,
            applied=applied,
            recovering=loaded.recovering,
            vote_unknown=loaded.vote_unknown,
        )
        self._core = RaftCore(self.id, list(self.peers), self._config, self._rng, restored)
        self._term = self._core.term
        host, port = split_host_port(self.peers[self.id])
        try:
            self._sock = socket.create_server((host, port), backlog=128, reuse_port=False)
        except OSError as exc:
            journal.close()
            raise RaftBindError(f"cannot listen for raft on {host}:{port}: {exc.strerror}") from exc
        self._publish()
        self._thread = threading.Thread(target=self._run, name=f"raft-{self.id}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._start_error is not None:
            raise RuntimeError(f"raft engine failed to start: {self._start_error}") from self._start_error

    def _replay(self, loaded: Loaded) -> int:
        """Bring the state machine to the persisted commit index; returns it."""
        if loaded.snapshot.index:
            self.sm.restore(loaded.snapshot.data)
            self._clock.raise_floor(loaded.snapshot.ctime)
        applied = loaded.snapshot.index
        for e in loaded.entries:
            if e.index > loaded.hard_state.commit:
                break
            if e.kind is EntryKind.NORMAL:
                self._apply_entry(e)
            self._clock.raise_floor(e.ctime)
            applied = e.index
        if loaded.snapshot.index or loaded.entries:
            log.info(
                "raft %s replayed its journal: snapshot %d, applied up to %d, term %d%s",
                self.id,
                loaded.snapshot.index,
                applied,
                loaded.hard_state.term,
                " (recovering)" if loaded.recovering else "",
            )
        return applied

    def stop(self, transfer_leadership: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the engine; a leader first hands leadership to its most up-to-date peer."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or self._stopping:
            return
        if transfer_leadership and self._published.role is Role.LEADER and len(self.peers) > 1:
            loop.call_soon_threadsafe(self._transfer_leadership)
            deadline = time.monotonic() + self.timings.election_timeout_min_s
            while time.monotonic() < deadline and self._published.role is Role.LEADER:
                time.sleep(0.005)
        self._stopping = True
        stop_event = self._stop_event
        if stop_event is not None:
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout_s)

    # -- the public, thread-safe API ---------------------------------------------------------------

    def propose(self, data: bytes) -> concurrent.futures.Future[object]:
        """Resolves with the state machine's `apply` result on this node, once committed and
        applied here; fails fast with a typed error (see controlplane/raft/errors.py)."""
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        pub = self._published
        error: Exception | None = None
        if self._stopping or self._loop is None:
            error = StoppedError("the raft node is stopped")
        elif len(data) > self.limits.max_entry_bytes:
            error = EntryTooLargeError(f"{len(data)} bytes is over the {self.limits.max_entry_bytes} limit")
        elif pub.disk_error is not None:
            error = DiskFailedError(f"this node cannot write its journal: {pub.disk_error}")
        elif pub.leader is None:
            error = NoLeaderError("no raft leader is known right now")
        if error is None:
            with self._lock:
                if self._in_flight >= self.limits.max_pending_proposals:
                    error = QueueFullError(f"{self._in_flight} proposals in flight")
                else:
                    self._in_flight += 1
        if error is not None:
            fut.set_exception(error)
            return fut
        fut.add_done_callback(self._release_slot)
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._take_proposal, bytes(data), fut)
        except RuntimeError:
            fut.set_exception(StoppedError("the raft node is stopped"))
        return fut

    def _release_slot(self, _fut: concurrent.futures.Future[object]) -> None:
        with self._lock:
            self._in_flight -= 1

    def read_index(self) -> concurrent.futures.Future[int]:
        """Resolves with an index such that everything committed before this call is
        applied here (linearizable reads from the local state machine)."""
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self._stopping or self._loop is None:
            fut.set_exception(StoppedError("the raft node is stopped"))
        elif self._published.leader is None:
            fut.set_exception(NoLeaderError("no raft leader is known right now"))
        else:
            try:
                self._loop.call_soon_threadsafe(self._take_read, fut)
            except RuntimeError:
                fut.set_exception(StoppedError("the raft node is stopped"))
        return fut

    def status(self) -> RaftStatus:
        return status_of(self.id, self._published, time.monotonic())

    def fresh(self) -> bool:
        """`status().fresh` without building the status (asked on every answered read)."""
        return is_fresh(self._published, time.monotonic())

    def cluster_time(self) -> float | None:
        """This node's estimate of cluster time (None before it has heard of any)."""
        return self._published.clock.at(time.monotonic())

    # -- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.SelectorEventLoop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() or logged; the thread ends either way
            if not self._started.is_set():
                self._start_error = exc
            else:
                log.critical("raft engine %s stopped by an error", self.id, exc_info=True)
        finally:
            self._fail_everything(StoppedError("the raft node is stopped"))
            self._stopping = True
            if self._journal is not None:
                self._journal.close()
            loop.close()
            self._started.set()

    async def _main(self) -> None:
        assert self._sock is not None
        self._stop_event = asyncio.Event()
        t = self.timings
        self._transport = Transport(
            self.id,
            self.dial,
            self._secret,
            TransportConfig(
                connect_timeout_s=t.connect_timeout_s,
                handshake_timeout_s=t.handshake_timeout_s,
                idle_timeout_s=t.idle_timeout_s,
                keepalive_s=t.keepalive_s,
                max_frame_bytes=self.limits.max_frame_bytes,
                queue_messages=self.limits.peer_queue_messages,
                queue_bytes=self.limits.peer_queue_bytes,
                max_connections=self.limits.max_connections,
                max_unauthenticated=self.limits.max_unauthenticated,
            ),
            self._sock,
            self._on_payload,
        )
        asyncio.get_running_loop().set_exception_handler(self._on_loop_error)
        await self._transport.start()
        self._started.set()
        ticker = asyncio.create_task(self._tick_loop(), name=f"raft-tick-{self.id}")
        ticker.add_done_callback(self._on_ticker_done)
        try:
            await self._stop_event.wait()
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            for task in self._snap_senders.values():
                task.cancel()
            await self._transport.close()

    def _on_ticker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fatal("the tick loop failed", task.exception())

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception escaped a callback or task of the engine: a bug. Stop loudly rather
        than run on with a core in an unknown state."""
        error = context.get("exception")
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("raft %s: %s", self.id, context.get("message"))
            return
        self._fatal(str(context.get("message")), error if isinstance(error, BaseException) else None)

    def _fatal(self, what: str, error: BaseException | None) -> None:
        log.critical("raft %s stops: %s", self.id, what, exc_info=error)
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def _tick_loop(self) -> None:
        tick = self.timings.tick_s
        next_at = time.monotonic()
        while True:
            next_at += tick
            delay = next_at - time.monotonic()
            if delay < -10 * tick:
                next_at = time.monotonic()  # we were stalled; do not replay missed ticks
            await asyncio.sleep(max(0.0, delay))
            self._on_tick()

    def _on_tick(self) -> None:
        core = self._core
        assert core is not None
        now = time.monotonic()
        if self._pending_ready is not None:
            self._retry_disk(now)
            self._publish(now)
            return
        hint = self._clock.now(now)
        if hint is None and core.log.last_index() == 0:
            hint = time.time()  # a brand-new cluster: the first leader seeds cluster time
        core.tick(hint)
        self._maybe_probe_freshness(now)
        if now >= self._next_timeout_check:
            self._next_timeout_check = now + 0.05
            self._expire(now)
        self._process()
        self._publish(now)

    # -- inbound ----------------------------------------------------------------------------------------

    def _on_payload(self, peer: str, payload: bytes) -> None:
        try:
            env = codec.unpackb(payload)
            if not isinstance(env, list) or not env or type(env[0]) is not int:
                raise codec.DecodeError("envelope must be a list starting with its kind")
            kind = env[0]
            if kind == _RAFT and len(env) == 2:
                self._on_raft(peer, codec.message_from_wire(env[1]))
            elif kind == _PROP and len(env) == 3:
                self._on_forwarded_proposal(peer, env[1], env[2])
            elif kind == _PROP_RESP and len(env) == 6:
                self._on_proposal_answer(peer, env)
            elif kind == _SNAP_CHUNK and len(env) == 6:
                self._on_snapshot_chunk(peer, env)
            else:
                raise codec.DecodeError(f"unknown envelope kind {kind} of {len(env)} fields")
        except codec.DecodeError as exc:
            self.counters["bad_messages"] += 1
            log.warning("raft %s: malformed message from %s dropped: %s", self.id, peer, exc)
        except Exception as exc:  # a bug (e.g. LogSafetyError): stop loudly, never limp on
            self._fatal(f"handling a message from {peer} failed", exc)
            raise
        self._schedule()

    def _on_raft(self, peer: str, m: Message) -> None:
        core = self._core
        assert core is not None
        if m.src != peer or m.dst != self.id:
            # Identity comes from the handshake: a peer may not speak for another.
            self.counters["bad_messages"] += 1
            log.warning(
                "raft %s: message from %s claiming src=%s dst=%s dropped", self.id, peer, m.src, m.dst
            )
            return
        if self._pending_ready is not None:
            self.counters["messages_dropped_disk"] += 1
            return  # no acks, no votes while the disk fails
        now = time.monotonic()
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP) and m.wall > 0:
            self._leader_token[peer] = m.wall
        elif m.type in (MsgType.APP_RESP, MsgType.HEARTBEAT_RESP) and m.term == core.term:
            asked = self._sent_tokens.get(m.wall) if m.wall > 0 else now
            if asked is not None:
                self._peer_acked[peer] = max(self._peer_acked.get(peer, 0.0), asked)
        core.step(m)
        if (
            m.term == core.term
            and peer == core.leader
            and m.type
            in (
                MsgType.APP,
                MsgType.HEARTBEAT,
                MsgType.SNAP,
                MsgType.READ_INDEX_RESP,
            )
        ):
            self._leader_heard = now
            self._clock.observe_leader(m.ctime, now)
            if m.type is MsgType.READ_INDEX_RESP:
                probe = self._probes.get(m.context)
                if probe is not None and m.wall > 0:
                    rtt = now - probe.sent_mono
                    self._skew = m.wall - (time.time() - rtt / 2)

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._process)

    # -- proposals --------------------------------------------------------------------------------------

    def _take_proposal(self, data: bytes, fut: concurrent.futures.Future[object]) -> None:
        if not self._proposal_batch:
            assert self._loop is not None
            self._loop.call_soon(self._flush_proposals)
        self._proposal_batch.append((data, fut))

    def _flush_proposals(self) -> None:
        batch, self._proposal_batch = self._proposal_batch, []
        batch = [(d, f) for d, f in batch if not f.done()]
        if not batch:
            return
        core = self._core
        assert core is not None
        now = time.monotonic()
        if self._pending_ready is not None:
            self._fail([f for _, f in batch], DiskFailedError(f"this node cannot write: {self._disk_error}"))
            return
        if core.role is Role.LEADER:
            try:
                first, term = core.propose([d for d, _ in batch], self._leader_ctime(now))
            except ProposalRefused as exc:
                self._fail([f for _, f in batch], NotLeaderError(exc.reason))
                return
            deadline = now + self.timings.commit_timeout_s
            for n, (_, fut) in enumerate(batch):
                self._pending[first + n] = _Pending(term, fut, deadline)
            self.counters["proposals"] += len(batch)
            self._process()
            return
        leader = core.leader
        if leader is None:
            self._fail([f for _, f in batch], NoLeaderError("no raft leader is known right now"))
            return
        req = next(self._ids)
        self._forwards[req] = _Forward([f for _, f in batch], now + self.timings.forward_timeout_s, leader)
        self.counters["proposals_forwarded"] += len(batch)
        self._send_envelope(leader, [_PROP, req, [d for d, _ in batch]])

    def _on_forwarded_proposal(self, peer: str, req: Any, datas: Any) -> None:
        if (
            type(req) is not int
            or not isinstance(datas, list)
            or not all(isinstance(d, bytes) for d in datas)
        ):
            raise codec.DecodeError("malformed forwarded proposal")
        core = self._core
        assert core is not None
        if any(len(d) > self.limits.max_entry_bytes for d in datas):
            self._send_envelope(peer, [_PROP_RESP, req, 0, 0, "too_large", "entry over the size limit"])
            return
        if self._pending_ready is not None:
            self._send_envelope(
                peer, [_PROP_RESP, req, 0, 0, "disk", f"leader disk failed: {self._disk_error}"]
            )
            return
        try:
            if core.role is not Role.LEADER:
                raise ProposalRefused("not the leader", core.leader)
            first, term = core.propose(datas, self._leader_ctime(time.monotonic()))
        except ProposalRefused as exc:
            self._send_envelope(peer, [_PROP_RESP, req, 0, 0, "not_leader", f"{self.id}: {exc.reason}"])
            return
        self.counters["proposals"] += len(datas)
        self._send_envelope(peer, [_PROP_RESP, req, first, term, "", ""])

    def _on_proposal_answer(self, peer: str, env: list[Any]) -> None:
        _, req, first, term, code, text = env
        if (
            type(req) is not int
            or type(first) is not int
            or type(term) is not int
            or not isinstance(text, str)
        ):
            raise codec.DecodeError("malformed proposal answer")
        fwd = self._forwards.pop(req, None)
        if fwd is None:
            return
        if code:
            self._fail(fwd.futures, NotLeaderError(f"forwarded to {peer}, refused: {text}"))
            return
        core = self._core
        assert core is not None
        deadline = time.monotonic() + self.timings.commit_timeout_s
        for n, fut in enumerate(fwd.futures):
            index = first + n
            if index <= core.applied:
                self._resolve_from_memory(index, term, fut)
            else:
                self._pending[index] = _Pending(term, fut, deadline)

    def _resolve_from_memory(self, index: int, term: int, fut: concurrent.futures.Future[object]) -> None:
        known = self._results.get(index)
        if known is None:
            _set_exception(
                fut, CommitTimeoutError(f"entry {index} was applied before its result could be kept")
            )
        elif known[0] == term:
            _set_result(fut, known[1])
        else:
            _set_exception(fut, ProposalDroppedError(f"another entry was committed at {index}"))

    def _leader_ctime(self, now: float) -> float:
        value = self._clock.now(now)
        return value if value is not None else time.time()

    # -- reads and freshness -----------------------------------------------------------------------------

    def _take_read(self, fut: concurrent.futures.Future[int]) -> None:
        core = self._core
        assert core is not None
        context = b"r%d" % next(self._ids)
        if self._pending_ready is not None:
            _set_exception(fut, DiskFailedError(f"this node cannot write its journal: {self._disk_error}"))
            return
        if len(self._reads) + len(self._read_waits) >= self.limits.max_pending_reads:
            _set_exception(fut, QueueFullError(f"{len(self._reads)} ReadIndex requests in flight"))
            return
        if not core.read_index(context):
            _set_exception(fut, NoLeaderError("no raft leader is known right now"))
            return
        self._reads[context] = (fut, time.monotonic() + self.timings.commit_timeout_s)
        self._schedule()

    def _maybe_probe_freshness(self, now: float) -> None:
        core = self._core
        assert core is not None
        if now < self._next_probe or core.role is Role.LEADER or core.leader is None:
            return
        self._next_probe = now + self.timings.fresh_probe_s
        context = b"f%d" % next(self._ids)
        if core.read_index(context):
            self._probes[context] = _Probe(now, time.time(), core.term)
            while len(self._probes) > 64:
                self._probes.popitem(last=False)

    def _update_freshness(self, now: float) -> None:
        core = self._core
        assert core is not None
        if core.role is Role.LEADER:
            acked = sum(1 for t in self._peer_acked.values() if now - t <= self.timings.fresh_window_s)
            if (
                acked + 1 >= quorum_size(core.voters)
                and core.committed_in_term()
                and core.applied >= core.committed
            ):
                self._fresh_until = now + self.timings.fresh_window_s
            return
        done = [c for c, p in self._probes.items() if p.index is not None and core.applied >= p.index]
        for context in done:
            probe = self._probes.pop(context)
            if probe.term == core.term:
                self._fresh_until = max(self._fresh_until, probe.sent_mono + self.timings.fresh_window_s)

    # -- the Ready loop ------------------------------------------------------------------------------------

    def _process(self) -> None:
        self._scheduled = False
        core = self._core
        journal = self._journal
        assert core is not None and journal is not None
        while self._pending_ready is None and core.has_ready():
            rd = core.ready()
            try:
                journal.save(rd.hard_state, rd.snapshot, rd.entries, rd.commit)
            except OSError as exc:
                self._disk_failed(exc, rd)
                return
            self._after_persist(rd)
        self._maybe_compact()

    def _after_persist(self, rd: Ready) -> None:
        core = self._core
        assert core is not None and self._journal is not None
        now = time.monotonic()
        self.counters["fsyncs"] = self._journal.fsyncs
        # First, so a new leader's first messages already carry its cluster time.
        self._role_change(rd, now)
        leading = rd.role is Role.LEADER
        ctime = self._clock.now(now) or 0.0
        wall = time.time()
        if leading and rd.messages:
            self._remember_token(wall, now)
        for msg in rd.messages:
            if leading:
                m = replace(msg, ctime=ctime, wall=wall)
            elif msg.type in (MsgType.APP_RESP, MsgType.HEARTBEAT_RESP):
                m = replace(msg, wall=self._leader_token.get(msg.dst, 0.0))
            else:
                m = msg
            if m.type in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP) and not m.reject:
                self.counters["votes_granted" if m.type is MsgType.VOTE_RESP else "pre_votes_granted"] += 1
            if m.type is MsgType.SNAP and m.snapshot is not None:
                self._send_snapshot(m)
            else:
                self._send_envelope(m.dst, [_RAFT, codec.message_to_wire(m)])
        if rd.snapshot is not None:
            self.sm.restore(rd.snapshot.data)
            self._clock.raise_floor(rd.snapshot.ctime)
            self.counters["snapshots_installed"] += 1
            self._applied_bytes = 0
            log.info("raft %s installed a snapshot at %d from the leader", self.id, rd.snapshot.index)
            # Proposals this snapshot covers: their outcome is no longer known here.
            for index in [i for i in self._pending if i <= rd.snapshot.index]:
                _set_exception(
                    self._pending.pop(index).future,
                    CommitTimeoutError(f"entry {index} was covered by a snapshot; outcome unknown here"),
                )
        # Futures are resolved last, once status() shows what they report.
        later: list[tuple[concurrent.futures.Future[Any], object, bool]] = []
        for e in rd.committed:
            result: object = None
            self._applied_bytes += e.size()
            if e.kind is EntryKind.NORMAL:
                result = self._apply_entry(e)
            self._clock.raise_floor(e.ctime)
            self._remember(e.index, e.term, result, now)
            pending = self._pending.pop(e.index, None)
            if pending is not None:
                if pending.term != e.term:
                    outcome = ProposalDroppedError(f"another entry was committed at {e.index}")
                    later.append((pending.future, outcome, True))
                elif isinstance(result, _ApplyFailure):
                    later.append((pending.future, result.error, True))
                else:
                    later.append((pending.future, result, False))
        for rs in rd.read_states:
            probe = self._probes.get(rs.context)
            if probe is not None:
                probe.index = rs.index
                continue
            read = self._reads.pop(rs.context, None)
            if read is not None:
                self._read_waits.append((rs.index, read[0], read[1]))
        core.advance(rd)
        if self._read_waits:
            waiting = []
            for index, fut, deadline in self._read_waits:
                if core.applied >= index:
                    later.append((fut, index, False))
                else:
                    waiting.append((index, fut, deadline))
            self._read_waits = waiting
        self._update_freshness(now)
        if later or rd.committed or rd.snapshot is not None:
            # status() shows what the state machine holds now, not a tick later.
            self._publish(now)
            for fut, value, is_error in later:
                if is_error:
                    assert isinstance(value, BaseException)
                    _set_exception(fut, value)
                else:
                    _set_result(fut, value)

    def _apply_entry(self, e: Entry) -> object:
        self.counters["applied_entries"] += 1
        try:
            return self.sm.apply(e.index, e.term, e.ctime, e.data)
        except Exception as exc:  # the contract says it must not raise; we report and go on
            self.counters["apply_errors"] += 1
            log.error("raft %s: state machine apply of entry %d raised", self.id, e.index, exc_info=True)
            return _ApplyFailure(exc)

    def _remember(self, index: int, term: int, result: object, now: float) -> None:
        results = self._results
        results[index] = (term, result, now)
        horizon = now - self.timings.forward_timeout_s - _RESULT_SLACK_S
        while len(results) > _RESULT_MEMORY or next(iter(results.values()))[2] < horizon:
            results.popitem(last=False)

    def _remember_token(self, wall: float, now: float) -> None:
        tokens = self._sent_tokens
        tokens.setdefault(wall, now)  # two batches with one reading: the earlier counts
        horizon = now - 2 * self.timings.fresh_window_s  # older answers prove nothing fresh
        while tokens and (len(tokens) > _TOKEN_MEMORY or next(iter(tokens.values())) < horizon):
            tokens.popitem(last=False)

    def _role_change(self, rd: Ready, now: float) -> None:
        core = self._core
        assert core is not None
        if rd.term != self._term:
            self._fresh_until = 0.0  # freshness is per term
            self._peer_acked.clear()
            self._sent_tokens.clear()
            self._abandon_forwards(rd.term)
        if rd.role is Role.LEADER and self._role is not Role.LEADER:
            start = core.log.last_index()
            noop_ctime = core.log.entry(start).ctime if start > core.log.offset else 0.0
            self._clock.become_leader(now, time.time(), noop_ctime)
            log.info("raft %s is the leader of term %d", self.id, rd.term)
        if rd.leader != self._leader and rd.leader is not None and rd.leader != self.id:
            log.info("raft %s follows %s in term %d", self.id, rd.leader, rd.term)
        if self._role is Role.LEADER and rd.role is not Role.LEADER:
            why, core.step_down_reason = core.step_down_reason, None
            if why is not None and rd.term == self._term:
                log.warning("raft %s is no longer the leader (term %d): %s", self.id, rd.term, why)
            else:
                log.info("raft %s is no longer the leader (term %d)", self.id, rd.term)
        self._role, self._leader, self._term = rd.role, rd.leader, rd.term

    def _abandon_forwards(self, term: int) -> None:
        """Fail proposals forwarded to a leader of an earlier term, now, not at their timeout.

        A new term means that leader's answer may never come (it died or was cut off,
        which is why the term moved on). The outcome is unknown, as on a timeout (the
        entry may still commit), so callers retry as they would then: observations
        replace themselves and intents apply once by id. Waiting out the forward timeout
        instead delayed a black-holed region's down observation by seconds.
        """
        if not self._forwards:
            return
        for fwd in self._forwards.values():
            self._fail(
                fwd.futures,
                NotLeaderError(
                    f"forwarded to {fwd.leader}, then term {term} began before it answered; outcome unknown"
                ),
            )
        self._forwards.clear()

    # -- snapshots ----------------------------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        core = self._core
        journal = self._journal
        assert core is not None and journal is not None
        behind = core.applied - core.log.offset
        if behind <= 0 or time.monotonic() < self._compact_after:
            return
        if behind < self.timings.snapshot_entries and self._applied_bytes < self.timings.snapshot_bytes:
            return
        index = core.applied
        entry = core.log.entry(index)
        snap = Snapshot(index, entry.term, entry.ctime, self.sm.snapshot())
        try:
            journal.save_snapshot(snap)
            core.compact(index, snap)
            journal.compact(index)
        except OSError as exc:
            self._compact_after = time.monotonic() + 10.0
            log.error(
                "raft %s: cannot write a snapshot (%s); the log keeps growing, retrying in 10 s", self.id, exc
            )
            return
        self._applied_bytes = 0
        self.counters["snapshots_taken"] += 1

    def _send_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        assert snap is not None and self._loop is not None
        old = self._snap_senders.pop(m.dst, None)
        if old is not None:
            old.cancel()
        self.counters["snapshots_sent"] += 1
        self._snap_senders[m.dst] = self._loop.create_task(self._snapshot_sender(m, snap))

    async def _snapshot_sender(self, m: Message, snap: Snapshot) -> None:
        """Chunks, paced by the peer's queue, so the queue never has to drop them."""
        transport = self._transport
        assert transport is not None
        header = codec.message_to_wire(m, with_snapshot_data=False)
        crc = zlib.crc32(snap.data)
        for off, chunk in chunks.split(snap.data, self.limits.snapshot_chunk_bytes):
            while transport.queued_bytes(m.dst) > self.limits.peer_queue_bytes // 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # pacing against the peer's queue: polling is enough
            self._send_envelope(m.dst, [_SNAP_CHUNK, header, off, len(snap.data), crc, chunk])

    def _on_snapshot_chunk(self, peer: str, env: list[Any]) -> None:
        _, header, off, total, crc, chunk = env
        m = codec.message_from_wire(header)
        if (
            type(off) is not int
            or type(total) is not int
            or type(crc) is not int
            or not isinstance(chunk, bytes)
        ):
            raise codec.DecodeError("malformed snapshot chunk")
        if m.snapshot is None or m.type is not MsgType.SNAP:
            raise codec.DecodeError("snapshot chunk without a snapshot message")
        try:
            data = self._assembler.add(
                peer, (m.term, m.snapshot.index, m.snapshot.term), off, total, crc, chunk
            )
        except ValueError as exc:  # oversized, or a bad checksum: the leader will resend
            log.warning("raft %s: snapshot from %s dropped: %s", self.id, peer, exc)
            return
        if data is None:
            return
        self._on_raft(peer, replace(m, snapshot=replace(m.snapshot, data=data)))

    # -- disk failure ---------------------------------------------------------------------------------------

    def _disk_failed(self, exc: OSError, rd: Ready) -> None:
        core = self._core
        assert core is not None
        now = time.monotonic()
        self._pending_ready = rd
        self._disk_error = f"{exc.strerror or exc} ({self.data_dir})"
        self._disk_failed_at = self._disk_reminded = now
        self._disk_next_retry = now + self.timings.disk_retry_s
        was_leader = core.role is Role.LEADER
        core.step_down()
        log.error(
            "raft %s: journal write failed: %s; %sno writes, acks or votes from this node until the disk "
            "recovers (retrying every %.1f s)",
            self.id,
            self._disk_error,
            "stepped down as leader; " if was_leader else "",
            self.timings.disk_retry_s,
        )
        error = DiskFailedError(f"this node cannot write its journal: {self._disk_error}")
        self._fail([p.future for p in self._pending.values()], error)
        self._pending.clear()
        for fwd in self._forwards.values():
            self._fail(fwd.futures, error)
        self._forwards.clear()
        self._publish(now)

    def _retry_disk(self, now: float) -> None:
        rd = self._pending_ready
        journal = self._journal
        assert rd is not None and journal is not None
        if now < self._disk_next_retry:
            return
        self._disk_next_retry = now + self.timings.disk_retry_s
        try:
            journal.save(rd.hard_state, rd.snapshot, rd.entries, rd.commit)
        except OSError as exc:
            if now - self._disk_reminded >= self.timings.disk_reminder_s:
                self._disk_reminded = now
                log.error(
                    "raft %s: journal writes still failing after %.0f s: %s",
                    self.id,
                    now - self._disk_failed_at,
                    exc.strerror or exc,
                )
            return
        log.warning(
            "raft %s: journal writes succeed again after %.1f s; rejoining",
            self.id,
            now - self._disk_failed_at,
        )
        self._pending_ready = None
        self._disk_error = None
        self._after_persist(rd)
        self._process()

    # -- helpers --------------------------------------------------------------------------------------------

    def _send_envelope(self, peer: str, env: list[Any]) -> None:
        assert self._transport is not None
        self._transport.send(peer, codec.packb(env))

    def _transfer_leadership(self) -> None:
        core = self._core
        if core is None or core.role is not Role.LEADER:
            return
        best = max(
            core.peers, key=lambda p: (p in self._peer_acked, (core.progress_of(p) or _NO_PROGRESS).match)
        )
        core.transfer_leadership(best)
        self._process()

    def _expire(self, now: float) -> None:
        for index in [i for i, p in self._pending.items() if p.deadline <= now]:
            _set_exception(
                self._pending.pop(index).future,
                CommitTimeoutError(f"entry {index} not applied within {self.timings.commit_timeout_s} s"),
            )
        for req in [r for r, f in self._forwards.items() if f.deadline <= now]:
            fwd = self._forwards.pop(req)
            self._fail(
                fwd.futures,
                CommitTimeoutError(
                    f"leader {fwd.leader} did not answer a forwarded proposal within "
                    f"{self.timings.forward_timeout_s} s; outcome unknown"
                ),
            )
        for context in [c for c, (_, d) in self._reads.items() if d <= now]:
            _set_exception(self._reads.pop(context)[0], ReadTimeoutError("ReadIndex not answered in time"))
        if self._read_waits:
            waiting = []
            for index, fut, deadline in self._read_waits:
                if deadline <= now:
                    _set_exception(fut, ReadTimeoutError(f"index {index} not applied here in time"))
                else:
                    waiting.append((index, fut, deadline))
            self._read_waits = waiting
        if self._core is not None and self._core.role is Role.LEADER:
            self._update_freshness(now)

    def _fail(self, futures: list[concurrent.futures.Future[object]], error: Exception) -> None:
        for fut in futures:
            _set_exception(fut, error)

    def _fail_everything(self, error: Exception) -> None:
        self._fail([f for _, f in self._proposal_batch], error)
        self._fail([p.future for p in self._pending.values()], error)
        for fwd in self._forwards.values():
            self._fail(fwd.futures, error)
        for fut, _ in self._reads.values():
            _set_exception(fut, error)
        for _, fut, _ in self._read_waits:
            _set_exception(fut, error)
        self._pending.clear()
        self._forwards.clear()
        self._reads.clear()
        self._read_waits = []

    def _publish(self, now: float | None = None) -> None:
        core = self._core
        if core is None:
            return
        now = time.monotonic() if now is None else now
        links = self._transport.status() if self._transport is not None else {}
        members = []
        for p in core.peers:
            link = links.get(p)
            pr = core.progress_of(p)
            members.append(
                MemberStatus(
                    id=p,
                    dial=self.dial[p],
                    connected_out=bool(link and link.connected_out),
                    connected_in=bool(link and link.connected_in),
                    last_heard_s=None
                    if not link or link.last_heard_mono is None
                    else now - link.last_heard_mono,
                    match=pr.match if pr is not None else None,
                )
            )
        if core.role is Role.LEADER:
            acked = sum(
                1 for t in self._peer_acked.values() if now - t <= self.timings.election_timeout_min_s
            )
            has_quorum = acked + 1 >= quorum_size(core.voters)
        else:
            has_quorum = (
                core.leader is not None and now - self._leader_heard <= self.timings.election_timeout_max_s
            )
        counters = dict(self.counters)
        transport_counters = self._transport.counters if self._transport is not None else {}
        counters.update({f"transport_{k}": transport_counters.get(k, 0) for k in TRANSPORT_COUNTERS})
        counters["transport_dropped"] = sum(link.dropped for link in links.values())
        self._published = Published(
            role=core.role,
            leader=core.leader if self._pending_ready is None else None,
            term=core.term,
            commit=core.committed,
            applied=core.applied,
            members=tuple(members),
            has_quorum=has_quorum and self._pending_ready is None,
            fresh_until=self._fresh_until if core.term == self._term else 0.0,
            recovering=core.recovering,
            vote_unknown=core.vote_unknown,
            disk_error=self._disk_error,
            ticked_at=now,
            clock=self._clock.reading,
            clock_skew_s=self._skew if core.role is not Role.LEADER else 0.0,
            counters=counters,
            damage=self._loaded.damage if self._loaded is not None else (),
        )


class _ApplyFailure:
    def __init__(self, error: Exception) -> None:
        self.error = error


class _NoProgress:
    match = 0


_NO_PROGRESS = _NoProgress()


def _set_result(fut: concurrent.futures.Future[Any], value: object) -> None:
    # The caller may cancel the future from its own thread at any moment.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_result(value)


def _set_exception(fut: concurrent.futures.Future[Any], error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_exception(error)
