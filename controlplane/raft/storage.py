"""The durable journal of one Raft node: checksummed, fsynced, and honest about damage.

Layout of the data directory:

- `wal-NNNNNNNNNN.log`: append-only segments of records `[u32 length][u32 crc32][payload]`
  (big-endian; the payload is msgpack): `[0, index, term, ctime, kind, data]` for an
  entry, `[1, commit]` for a commit mark. One `save()` (one Ready) is one `write()` and
  one `os.fdatasync`, so a batch of entries costs one disk flush.
- `hardstate.0` / `hardstate.1`: term, vote and commit, written alternately with fsync,
  each one record as above with a sequence number; the newest valid one wins. Term and
  vote change only in elections, so most Readys touch only the segment: the commit index
  travels in the segment as a commit mark, in the same flush as the entries.
- `snapshot`: magic, a checksummed header (index, term, ctime, size, data crc32) and the
  data; written to `snapshot.tmp`, fsynced, renamed, and the directory fsynced.

Order inside `save()`: hard state first (a vote is durable before anything promises
it), then the snapshot, then entries and the commit mark. The shell sends the messages
of a Ready only after `save()` returned, and applies entries only after it, so a
restarted node replays at least everything it applied before.

No mmap: a full disk is an OSError (ENOSPC) from write or fsync, which the shell reports
and retries; a failed write is cut back off the segment so the file stays well formed.

What `open()` does with what it finds:

- a torn tail (the last record of the last segment incomplete or bad, with nothing valid
  after it) is what a crash leaves: cut off, logged at INFO;
- a bad record followed by valid data, a bad record in an earlier segment, an
  unreadable segment, a gap in the indices, or a bad snapshot is DAMAGE: one ERROR line
  naming the file and the offset, everything from the damage on is discarded, and the
  node starts `recovering`: it neither votes nor campaigns until it has caught up with a
  leader (see core.py), then rejoins as a normal follower by itself;
- one unreadable hard-state slot is what a crash during an election leaves (the slot
  being written is torn, the other holds the previous state, and nothing that depended
  on the torn write was sent): WARNING, the other slot is used;
- both slots unreadable (or missing while the journal holds data): ERROR, recovering,
  and `vote_unknown`. Why: the node may have voted in some term T up to its lost current
  term, and it cannot know T. While recovering it grants no vote at all, and it leaves
  recovering only by catching up with a leader, whose term the rest of the cluster
  reached. After that it grants votes only in terms above every term it has seen since
  start (in any message except pre-votes, which promise nothing), and its own campaigns
  start above that too. The candidate it voted for in T keeps T durably and carries it
  in every message, so once anything from that candidate or its voters is heard, T is
  below the floor. What this cannot rule out: the candidate won T with exactly a
  majority that included this node, is silent since, no other node it reached is heard
  from, and a stale leader of an earlier term let this node catch up; then a second
  vote in T is possible. That needs both slot files destroyed at once (a crash tears at
  most one) on top of that interleaving; it is documented rather than claimed away,
  and an operator who finds both slots gone can also wipe the node's directory, which
  makes it a fresh follower with no vote history to protect.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.errors import ControlplaneError
from controlplane.raft import codec
from controlplane.raft.messages import Entry, EntryKind, HardState, Snapshot

log = logging.getLogger("controlplane.raft.storage")

_HEADER = struct.Struct(">II")
_SNAP_MAGIC = b"CPRSNAP1"
_ENTRY = 0
_COMMIT = 1
MAX_RECORD_BYTES = 64 << 20
DEFAULT_SEGMENT_BYTES = 16 << 20
_STALE = "stale"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `Journal.open` found, ready to build a `core.Restored` from."""

    hard_state: HardState
    snapshot: Snapshot
    entries: tuple[Entry, ...]
    recovering: bool
    vote_unknown: bool
    damage: tuple[str, ...]  # the ERROR lines logged, for status and tests


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    size: int
    last_index: int  # the last entry index stored in it or, if none, before it


def _record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _entry_record(e: Entry) -> bytes:
    return _record(codec.packb([_ENTRY, e.index, e.term, e.ctime, int(e.kind), e.data]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


class _Bad(ControlplaneError):
    """A record or file that does not verify."""


def _parse(payload: bytes) -> Entry | int:
    """An entry, or an int for a commit mark; _Bad for anything else."""
    try:
        rec = codec.unpackb(payload)
    except codec.DecodeError as exc:
        raise _Bad(f"undecodable record: {exc}") from None
    if isinstance(rec, list) and len(rec) == 2 and rec[0] == _COMMIT and type(rec[1]) is int:
        return int(rec[1])
    if (
        isinstance(rec, list)
        and len(rec) == 6
        and rec[0] == _ENTRY
        and type(rec[1]) is int
        and type(rec[2]) is int
        and isinstance(rec[3], float)
        and rec[4] in (0, 1)
        and isinstance(rec[5], bytes)
    ):
        return Entry(rec[1], rec[2], rec[3], rec[5], EntryKind(rec[4]))
    raise _Bad("record of unknown shape")


def _read_record(buf: memoryview, off: int) -> tuple[Entry | int, int]:
    """The journal record at `off` and the offset after it; _Bad if it does not verify."""
    payload, end = _read_frame(buf, off)
    return _parse(payload), end


def _read_frame(buf: memoryview, off: int) -> tuple[bytes, int]:
    """The checksummed payload at `off` and the offset after it; _Bad if it does not verify."""
    if off + _HEADER.size > len(buf):
        raise _Bad("incomplete header")
    length, crc = _HEADER.unpack_from(buf, off)
    if length == 0 or length > MAX_RECORD_BYTES:
        raise _Bad(f"implausible length {length}")
    end = off + _HEADER.size + length
    if end > len(buf):
        raise _Bad(f"record of {length} bytes runs past the end of the file")
    payload = bytes(buf[off + _HEADER.size : end])
    if zlib.crc32(payload) != crc:
        raise _Bad("checksum mismatch")
    return payload, end


def _valid_record_after(buf: memoryview, start: int) -> bool:
    """Is there any verifying record after a bad one? (A torn tail has none.)"""
    for off in range(start + 1, len(buf) - _HEADER.size):
        length = int.from_bytes(buf[off : off + 4], "big")
        if length == 0 or off + _HEADER.size + length > len(buf):
            continue
        try:
            _read_record(buf, off)
        except _Bad:
            continue
        return True
    return False


class Journal:
    """Owns a data directory. Not thread-safe: one engine thread uses it."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        # index -> (segment seq, offset, term) of every stored entry after the snapshot.
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._first_index = 1
        self._last_index = 0
        self._snapshot = Snapshot()
        self._hard = HardState()
        self._hard_seq = 0
        self._commit_mark = 0
        self._mark_needed = False
        self.fsyncs = 0

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> tuple[Journal, Loaded]:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(directory.parent)
        j = cls(directory, segment_bytes)
        damage: list[str] = []
        hard, vote_unknown = j._load_hard_state(damage)
        snapshot = j._load_snapshot(damage)
        entries, marks = j._load_segments(damage, snapshot)
        has_data = bool(entries) or snapshot.index > 0
        if hard is None:
            if has_data:
                line = f"raft journal damaged: {directory}/hardstate.*: missing while the log holds data"
                log.error("%s; term and vote unknown, recovering from the leader", line)
                damage.append(line)
                vote_unknown = True
            hard = HardState()
        last = entries[-1].index if entries else snapshot.index
        commit = min(max(hard.commit, marks, snapshot.index), last)
        term = max(hard.term, entries[-1].term if entries else snapshot.term)
        hard = HardState(term, hard.vote if term == hard.term else None, commit)
        j._hard = hard
        j._commit_mark = commit
        j._open_tail()
        loaded = Loaded(hard, snapshot, tuple(entries), bool(damage), vote_unknown, tuple(damage))
        return j, loaded

    def _slot(self, n: int) -> Path:
        return self.dir / f"hardstate.{n}"

    def _read_slot(self, n: int) -> tuple[int, HardState] | str | None:
        path = self._slot(n)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        try:
            payload, _ = _read_frame(memoryview(data), 0)
            fields = codec.unpackb(payload)
        except _Bad as exc:
            return str(exc)
        except codec.DecodeError as exc:
            return str(exc)
        if not (
            isinstance(fields, list)
            and len(fields) == 4
            and all(type(x) is int for x in (fields[0], fields[1], fields[3]))
            and (fields[2] is None or isinstance(fields[2], str))
        ):
            return "record of unknown shape"
        return fields[0], HardState(fields[1], fields[2], fields[3])

    def _load_hard_state(self, damage: list[str]) -> tuple[HardState | None, bool]:
        slots = [self._read_slot(0), self._read_slot(1)]
        valid = [s for s in slots if isinstance(s, tuple)]
        bad = [(n, s) for n, s in enumerate(slots) if isinstance(s, str)]
        if valid:
            seq, hard = max(valid, key=lambda v: v[0])
            self._hard_seq = seq
            for n, why in bad:
                log.warning(
                    "raft hard-state slot %s is unreadable (%s): a write torn by a crash, or damage; "
                    "using the other slot (term %d)",
                    self._slot(n),
                    why,
                    hard.term,
                )
            return hard, False
        if bad:
            line = "raft journal damaged: " + "; ".join(
                f"{self._slot(n)} at offset 0: {why}" for n, why in bad
            )
            log.error("%s; term and vote unknown, recovering from the leader", line)
            damage.append(line)
            return HardState(), True
        return None, False

    def _load_snapshot(self, damage: list[str]) -> Snapshot:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "snapshot.tmp").unlink()
        path = self.dir / "snapshot"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Snapshot()
        except OSError as exc:
            return self._bad_snapshot(damage, path, 0, f"unreadable ({exc.strerror})")
        if data[: len(_SNAP_MAGIC)] != _SNAP_MAGIC:
            return self._bad_snapshot(damage, path, 0, "bad magic")
        buf = memoryview(data)
        start = len(_SNAP_MAGIC)
        if start + _HEADER.size > len(buf):
            return self._bad_snapshot(damage, path, start, "incomplete header")
        length, crc = _HEADER.unpack_from(buf, start)
        rec_end = start + _HEADER.size + length
        raw = bytes(buf[start + _HEADER.size : rec_end])
        if length > MAX_RECORD_BYTES or rec_end > len(buf) or zlib.crc32(raw) != crc:
            return self._bad_snapshot(damage, path, start, "header checksum mismatch")
        try:
            header = codec.unpackb(raw)
        except codec.DecodeError as exc:
            return self._bad_snapshot(damage, path, start, str(exc))
        if not (
            isinstance(header, list)
            and len(header) == 5
            and all(type(header[k]) is int for k in (0, 1, 3, 4))
            and isinstance(header[2], float)
        ):
            return self._bad_snapshot(damage, path, start, "header of unknown shape")
        index, term, ctime, size, crc = header
        body = bytes(buf[rec_end:])
        if len(body) != size:
            return self._bad_snapshot(damage, path, rec_end, f"{len(body)} data bytes, header says {size}")
        if zlib.crc32(body) != crc:
            return self._bad_snapshot(damage, path, rec_end, "data checksum mismatch")
        snap = Snapshot(int(index), int(term), float(ctime), body)
        self._snapshot = snap
        return snap

    def _bad_snapshot(self, damage: list[str], path: Path, offset: int, why: str) -> Snapshot:
        line = f"raft journal damaged: {path} at offset {offset}: {why}"
        log.error("%s; discarding the snapshot and the log, recovering from the leader", line)
        damage.append(line)
        # The log after a lost snapshot cannot be applied (its base is gone): start empty.
        for seg in self._segment_files():
            seg.unlink()
        path.unlink()
        _fsync_dir(self.dir)
        return Snapshot()

    def _segment_files(self) -> list[Path]:
        return sorted(self.dir.glob("wal-*.log"))

    def _load_segments(self, damage: list[str], snapshot: Snapshot) -> tuple[list[Entry], int]:
        entries: list[Entry] = []
        marks = 0
        files = self._segment_files()
        prev_last = snapshot.index
        for n, path in enumerate(files):
            seq = int(path.stem.split("-")[1])
            is_last = n == len(files) - 1
            try:
                data = path.read_bytes()
            except OSError as exc:
                self._damaged(damage, path, 0, f"unreadable ({exc.strerror})", files[n:], truncate_at=None)
                break
            buf = memoryview(data)
            off = 0
            bad: str | None = None
            stale = False
            while off < len(buf):
                try:
                    rec, end = _read_record(buf, off)
                except _Bad as exc:
                    bad = str(exc)
                    break
                if isinstance(rec, int):
                    marks = max(marks, rec)
                else:
                    problem = self._accept_entry(rec, entries, snapshot, seq, off)
                    if problem == _STALE:
                        stale = True
                        break
                    if problem is not None:
                        bad = problem
                        break
                off = end
            if stale:
                # The log a snapshot install replaced (the node crashed before it dropped
                # it): none of it belongs to the new log.
                log.info(
                    "raft journal %s: log before the installed snapshot %d discarded", path, snapshot.index
                )
                for p in files:
                    p.unlink(missing_ok=True)
                _fsync_dir(self.dir)
                entries.clear()
                self._positions.clear()
                self._segments = []
                marks = 0
                break
            if bad is not None:
                if is_last and not _valid_record_after(buf, off):
                    log.info("raft journal %s: torn tail at offset %d (%s) cut off", path, off, bad)
                    self._cut(path, off)
                    data_len = off
                else:
                    self._damaged(damage, path, off, bad, files[n + 1 :], truncate_at=off)
                    self._segments.append(_Segment(seq, path, off, self._last_or(entries, prev_last)))
                    break
            else:
                data_len = len(buf)
            prev_last = self._last_or(entries, prev_last)
            self._segments.append(_Segment(seq, path, data_len, prev_last))
        self._first_index = snapshot.index + 1
        self._last_index = entries[-1].index if entries else snapshot.index
        return entries, marks

    @staticmethod
    def _last_or(entries: list[Entry], default: int) -> int:
        return entries[-1].index if entries else default

    def _accept_entry(
        self, e: Entry, entries: list[Entry], snapshot: Snapshot, seq: int, off: int
    ) -> str | None:
        """None if `e` was taken or skipped, _STALE, or what is wrong with it."""
        if e.index < snapshot.index:
            return None
        if e.index == snapshot.index:
            return None if e.term == snapshot.term else _STALE
        expected = (entries[-1].index if entries else snapshot.index) + 1
        if e.index != expected:
            return (
                _STALE
                if not entries and e.index > expected
                else f"entry {e.index} where {expected} was expected"
            )
        entries.append(e)
        self._positions[e.index] = (seq, off, e.term)
        return None

    def _cut(self, path: Path, off: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, off)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _damaged(
        self,
        damage: list[str],
        path: Path,
        off: int,
        why: str,
        later: Sequence[Path],
        truncate_at: int | None,
    ) -> None:
        line = f"raft journal damaged: {path} at offset {off}: {why}"
        log.error(
            "%s; discarding it and everything after (%d later segments), recovering from the leader "
            "(no vote until caught up)",
            line,
            len(later),
        )
        damage.append(line)
        for p in later:
            p.unlink()
        if truncate_at is None:
            path.rename(path.with_suffix(".damaged"))
        else:
            self._cut(path, truncate_at)
        _fsync_dir(self.dir)

    def _open_tail(self) -> None:
        if not self._segments:
            self._new_segment(1)
            return
        seg = self._segments[-1]
        self._fd = os.open(seg.path, os.O_WRONLY)
        os.lseek(self._fd, seg.size, os.SEEK_SET)

    def _new_segment(self, seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.dir / f"wal-{seq:010d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._segments.append(_Segment(seq, path, 0, self._last_index))

    # -- writing ---------------------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard

    @property
    def last_index(self) -> int:
        return self._last_index

    def save(
        self, hard: HardState | None, snapshot: Snapshot | None, entries: Sequence[Entry], commit: int
    ) -> None:
        """Make one Ready durable. On OSError nothing is half-written; call again to retry."""
        if hard is not None and (hard.term, hard.vote) != (self._hard.term, self._hard.vote):
            self._write_hard(HardState(hard.term, hard.vote, max(commit, self._commit_mark)))
        if snapshot is not None and snapshot.index > self._snapshot.index:
            self.save_snapshot(snapshot)
            if self._term_at(snapshot.index) != snapshot.term:
                self._reset_log(snapshot)
            self._mark_needed = True
        if entries and entries[0].index <= self._last_index:
            self._truncate_from(entries[0].index)
            self._mark_needed = True
        records = [_entry_record(e) for e in entries]
        if commit > self._commit_mark or self._mark_needed:
            records.append(_record(codec.packb([_COMMIT, commit])))
        if not records:
            return
        if self._segments[-1].size >= self.segment_bytes:
            self._new_segment(self._segments[-1].seq + 1)
        buf = b"".join(records)
        self._append(buf)
        seg = self._segments[-1]
        off = seg.size
        for e, rec in zip(entries, records, strict=False):
            self._positions[e.index] = (seg.seq, off, e.term)
            off += len(rec)
        seg.size += len(buf)
        if entries:
            self._last_index = entries[-1].index
            seg.last_index = self._last_index
        self._commit_mark = max(self._commit_mark, commit)
        self._mark_needed = False
        if hard is not None:
            self._hard = HardState(self._hard.term, self._hard.vote, self._commit_mark)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        seg = self._segments[-1]
        try:
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
            self.fsyncs += 1
        except OSError:
            # Cut a partial write back off, so a later retry does not leave a bad record
            # followed by valid ones (which would read as damage). This needs no space.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
                os.lseek(self._fd, seg.size, os.SEEK_SET)
            raise

    def _write_hard(self, hard: HardState) -> None:
        seq = self._hard_seq + 1
        path = self._slot(seq % 2)
        created = not path.exists()
        data = _record(codec.packb([seq, hard.term, hard.vote, hard.commit]))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            self.fsyncs += 1
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.dir)
        self._hard_seq = seq
        self._hard = hard

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Write the snapshot file atomically (temp file, fsync, rename, directory fsync)."""
        header = codec.packb(
            [snapshot.index, snapshot.term, snapshot.ctime, len(snapshot.data), zlib.crc32(snapshot.data)]
        )
        tmp = self.dir / "snapshot.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, _SNAP_MAGIC + _record(header))
            _write_all(fd, snapshot.data)
            os.fsync(fd)
            self.fsyncs += 1
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self.dir / "snapshot")
        _fsync_dir(self.dir)
        self._snapshot = snapshot

    def _term_at(self, index: int) -> int | None:
        pos = self._positions.get(index)
        return pos[2] if pos else None

    def _reset_log(self, snapshot: Snapshot) -> None:
        """A snapshot from the leader replaced the whole log: drop every segment."""
        next_seq = self._segments[-1].seq + 1 if self._segments else 1
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for seg in self._segments:
            seg.path.unlink()
        self._segments = []
        self._positions.clear()
        self._last_index = snapshot.index
        self._first_index = snapshot.index + 1
        self._new_segment(next_seq)

    def _truncate_from(self, index: int) -> None:
        pos = self._positions.get(index)
        if pos is None:
            raise ValueError(
                f"cannot truncate from {index}: not stored ({self._first_index}..{self._last_index})"
            )
        seq, off, _ = pos
        removed = False
        while self._segments[-1].seq > seq:
            seg = self._segments.pop()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            seg.path.unlink()
            removed = True
        seg = self._segments[-1]
        if self._fd is None:
            self._fd = os.open(seg.path, os.O_WRONLY)
        os.ftruncate(self._fd, off)
        os.lseek(self._fd, off, os.SEEK_SET)
        seg.size = off
        if removed:
            _fsync_dir(self.dir)
        for i in range(index, self._last_index + 1):
            self._positions.pop(i, None)
        self._last_index = index - 1
        seg.last_index = self._last_index

    def compact(self, index: int) -> None:
        """Drop segments wholly at or below `index` (the snapshot file covers them)."""
        if index > self._snapshot.index:
            raise ValueError(f"compact to {index} past the snapshot at {self._snapshot.index}")
        # Commit marks live in segments: record the current one in the newest before
        # older ones go.
        self._mark_needed = True
        self.save(None, None, (), self._commit_mark)
        dropped = False
        while len(self._segments) > 1 and self._segments[0].last_index <= index:
            seg = self._segments.pop(0)
            seg.path.unlink()
            dropped = True
        if dropped:
            _fsync_dir(self.dir)
        for i in [i for i in self._positions if i <= index]:
            del self._positions[i]
        self._first_index = index + 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def describe(loaded: Loaded) -> dict[str, Any]:
    """A summary for logs and status."""
    return {
        "term": loaded.hard_state.term,
        "commit": loaded.hard_state.commit,
        "snapshot": loaded.snapshot.index,
        "entries": len(loaded.entries),
        "recovering": loaded.recovering,
        "vote_unknown": loaded.vote_unknown,
    }
