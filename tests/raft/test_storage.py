"""The journal on real files: round trips, torn tails, damage, hard-state slots, full disk."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.raft import codec
from controlplane.raft.messages import Entry, HardState, Snapshot
from controlplane.raft.storage import Journal


def ents(lo: int, hi: int, term: int = 1, size: int = 20) -> list[Entry]:
    return [Entry(i, term, float(i), (b"%d-" % i) * (size // 3 + 1)) for i in range(lo, hi + 1)]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_round_trip_and_one_fsync_per_batch(tmp_path: Path) -> None:
    j, loaded = Journal.open(tmp_path / "d")
    assert loaded.entries == () and not loaded.recovering
    j.save(HardState(2, "n1", 0), None, ents(1, 10, 2), 0)
    before = j.fsyncs
    j.save(None, None, ents(11, 50, 2), 30)
    assert j.fsyncs == before + 1
    j.close()
    j2, loaded = Journal.open(tmp_path / "d")
    assert [e.index for e in loaded.entries] == list(range(1, 51))
    assert loaded.entries[10] == ents(11, 11, 2)[0]
    assert loaded.hard_state == HardState(2, "n1", 30)
    assert not loaded.recovering and loaded.damage == ()
    j2.close()


def test_conflict_truncation_survives_reopen(tmp_path: Path) -> None:
    j, _ = Journal.open(tmp_path, segment_bytes=300)
    j.save(HardState(1, None, 0), None, ents(1, 20, 1), 5)
    j.save(HardState(2, None, 5), None, ents(8, 9, 2), 8)
    j.close()
    _, loaded = Journal.open(tmp_path, segment_bytes=300)
    assert [(e.index, e.term) for e in loaded.entries][-3:] == [(7, 1), (8, 2), (9, 2)]
    assert loaded.hard_state.commit == 8 and loaded.damage == ()


def test_compaction_drops_segments_below_the_snapshot(tmp_path: Path) -> None:
    j, _ = Journal.open(tmp_path, segment_bytes=400)
    for k in range(10):
        j.save(HardState(1, None, 0) if k == 0 else None, None, ents(k * 10 + 1, k * 10 + 10), k * 10 + 10)
    segments = len(list(tmp_path.glob("wal-*.log")))
    snap = Snapshot(80, 1, 80.0, b"state@80")
    j.save_snapshot(snap)
    j.compact(80)
    assert len(list(tmp_path.glob("wal-*.log"))) < segments
    j.close()
    _, loaded = Journal.open(tmp_path, segment_bytes=400)
    assert loaded.snapshot == snap
    assert [e.index for e in loaded.entries] == list(range(81, 101))
    assert loaded.hard_state.commit == 100


def test_snapshot_install_replaces_the_log(tmp_path: Path) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(1, None, 0), None, ents(1, 10, 1), 3)
    snap = Snapshot(50, 3, 50.0, b"leader-state")
    j.save(HardState(3, None, 50), snap, ents(51, 52, 3), 50)
    j.close()
    _, loaded = Journal.open(tmp_path)
    assert loaded.snapshot == snap and [e.index for e in loaded.entries] == [51, 52]
    assert loaded.hard_state.commit == 50 and not loaded.recovering


def test_log_left_over_from_a_snapshot_install_crash_is_discarded(tmp_path: Path) -> None:
    # The node crashed after writing the snapshot file, before dropping the old log.
    j, _ = Journal.open(tmp_path)
    j.save(HardState(1, None, 0), None, ents(1, 10, 1), 3)
    j.save_snapshot(Snapshot(5, 2, 5.0, b"other-history"))
    j.close()
    _, loaded = Journal.open(tmp_path)
    assert loaded.snapshot.index == 5 and loaded.entries == ()
    assert not loaded.recovering


def test_torn_tail_is_cut_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(1, None, 0), None, ents(1, 10), 10)
    j.close()
    seg = sorted(tmp_path.glob("wal-*.log"))[-1]
    full = seg.read_bytes()
    record = codec.packb([0, 11, 1, 11.0, 0, b"x" * 100])
    with seg.open("ab") as f:
        f.write(len(record).to_bytes(4, "big") + b"\0\0\0\0" + record[:30])  # a write cut short
    caplog.set_level(logging.INFO, "controlplane.raft.storage")
    _, loaded = Journal.open(tmp_path)
    assert [e.index for e in loaded.entries] == list(range(1, 11))
    assert not loaded.recovering and errors(caplog) == []
    assert any("torn tail" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert seg.read_bytes() == full


def test_random_bytes_in_a_middle_record_are_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(1, None, 0), None, ents(1, 20, size=60), 20)
    j.close()
    seg = sorted(tmp_path.glob("wal-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    offset = len(data) // 2
    rng = random.Random(12)
    data[offset : offset + 8] = bytes(rng.randrange(256) for _ in range(8))
    seg.write_bytes(bytes(data))
    _, loaded = Journal.open(tmp_path)
    lines = errors(caplog)
    assert len(lines) == 1, lines
    assert str(seg) in lines[0] and "at offset" in lines[0]
    assert loaded.recovering
    assert 0 < len(loaded.entries) < 20
    assert loaded.hard_state.commit == loaded.entries[-1].index  # clamped to what is left
    # The damage was cut off: the next open finds a clean journal (still behind).
    caplog.clear()
    _, again = Journal.open(tmp_path)
    assert errors(caplog) == [] and again.entries == loaded.entries


def test_garbage_in_one_hard_state_slot_uses_the_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(3, "n2", 0), None, ents(1, 3, 3), 3)
    j.save(HardState(4, "n1", 3), None, [], 3)
    j.close()
    newest = tmp_path / "hardstate.0"  # slots alternate: sequence 1 -> slot 1, 2 -> slot 0
    newest.write_bytes(os.urandom(40))
    _, loaded = Journal.open(tmp_path)
    assert loaded.hard_state.term == 3 and loaded.hard_state.vote == "n2"
    assert not loaded.vote_unknown and errors(caplog) == []
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_garbage_in_both_hard_state_slots_means_vote_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(3, "n2", 0), None, ents(1, 3, 3), 3)
    j.save(HardState(4, "n1", 3), None, [], 3)
    j.close()
    for slot in tmp_path.glob("hardstate.*"):
        slot.write_bytes(b"\xff" * 30)
    _, loaded = Journal.open(tmp_path)
    assert loaded.vote_unknown and loaded.recovering
    assert loaded.hard_state.vote is None and loaded.hard_state.term == 3  # from the log
    assert len(errors(caplog)) == 1


def test_bad_snapshot_discards_everything_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j, _ = Journal.open(tmp_path)
    j.save(HardState(1, None, 0), None, ents(1, 10), 10)
    j.save_snapshot(Snapshot(8, 1, 8.0, b"S" * 1000))
    j.compact(8)
    j.close()
    path = tmp_path / "snapshot"
    data = bytearray(path.read_bytes())
    data[-500] ^= 0xFF
    path.write_bytes(bytes(data))
    _, loaded = Journal.open(tmp_path)
    lines = errors(caplog)
    assert len(lines) == 1 and str(path) in lines[0]
    assert loaded.recovering and loaded.snapshot == Snapshot() and loaded.entries == ()
    assert loaded.hard_state.commit == 0 and loaded.hard_state.term == 1


def test_unreadable_segment_is_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j, _ = Journal.open(tmp_path, segment_bytes=300)
    for k in range(6):
        j.save(HardState(1, None, 0) if k == 0 else None, None, ents(k * 5 + 1, k * 5 + 5), k * 5 + 5)
    j.close()
    segs = sorted(tmp_path.glob("wal-*.log"))
    assert len(segs) == 3
    segs[1].write_bytes(b"\0" * 7 + segs[1].read_bytes()[7:])  # header wiped
    _, loaded = Journal.open(tmp_path, segment_bytes=300)
    assert loaded.recovering and len(errors(caplog)) == 1
    assert loaded.entries[-1].index == 10
    assert not segs[2].exists()


# -- a full disk, for real (tmpfs) ------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    if os.geteuid() != 0:
        # make test runs as root in CI (it installs Debian packages): never skip there.
        if os.environ.get("CI"):
            pytest.fail("the full-disk test mounts a tmpfs and needs root; CI runs make test as root")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_an_error_not_a_crash_and_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt") as mnt:
        j, _ = Journal.open(mnt / "raft")
        j.save(HardState(1, None, 0), None, ents(1, 5), 5)
        filler = mnt / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        index = 6
        with pytest.raises(OSError) as failure:
            for _ in range(1000):
                j.save(None, None, ents(index, index + 9, size=4000), index)
                index += 10
        assert failure.value.errno == errno.ENOSPC
        stored = j.last_index
        filler.unlink()
        j.save(None, None, ents(stored + 1, stored + 10, size=4000), stored)
        j.close()
        _, loaded = Journal.open(mnt / "raft")
        assert loaded.damage == () and loaded.entries[-1].index == stored + 10
