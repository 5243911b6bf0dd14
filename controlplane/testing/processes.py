"""Which processes are alive, from /proc: for tests that prove nothing is left behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Proc", "children_of", "live_processes", "session_members"]


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    session: int


def live_processes() -> list[Proc]:
    """Every process that is not a zombie (one that exits meanwhile is left out)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 3 and fields[0] != "Z":
            out.append(Proc(int(entry.name), int(fields[1]), int(fields[3])))
    return out


def children_of(pid: int, *, recursive: bool = False) -> list[int]:
    """Live children of `pid`; with `recursive`, every live descendant."""
    by_parent: dict[int, list[int]] = {}
    for p in live_processes():
        by_parent.setdefault(p.ppid, []).append(p.pid)
    if not recursive:
        return by_parent.get(pid, [])
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def session_members(session_id: int) -> list[int]:
    """Pids of every live process in the session `session_id` (agents lead their own)."""
    return [p.pid for p in live_processes() if p.session == session_id]
