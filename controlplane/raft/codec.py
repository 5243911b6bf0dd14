"""msgpack, strictly: the only serialization of the engine, on the wire and on disk.

Nothing here can run code: msgpack decodes to plain lists, ints, floats, strings and
bytes; extension types are refused. Every decoded structure is checked for its shape
before it is turned into a `Message`, so a malformed frame from an authenticated peer
(a bug, or version skew) is a `DecodeError`, never an exception deep in the core.
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from controlplane.errors import ControlplaneError
from controlplane.raft.messages import Entry, EntryKind, Message, MsgType, Snapshot


class DecodeError(ControlplaneError, ValueError):
    """Bytes that are not a well-formed value of the expected shape."""


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not accepted")


def packb(obj: Any) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise DecodeError(f"expected a non-negative int, got {type(v).__name__}")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DecodeError(f"expected a number, got {type(v).__name__}")
    return float(v)


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise DecodeError(f"expected bytes, got {type(v).__name__}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise DecodeError(f"expected a string, got {type(v).__name__}")
    return v


def entry_to_wire(e: Entry) -> list[Any]:
    return [e.index, e.term, e.ctime, int(e.kind), e.data]


def entry_from_wire(v: Any) -> Entry:
    if not isinstance(v, list) or len(v) != 5:
        raise DecodeError("entry: expected a list of 5")
    kind = _int(v[3])
    if kind not in (0, 1):
        raise DecodeError(f"entry: unknown kind {kind}")
    return Entry(_int(v[0]), _int(v[1]), _float(v[2]), _bytes(v[4]), EntryKind(kind))


def message_to_wire(m: Message, with_snapshot_data: bool = True) -> list[Any]:
    snap = None
    if m.snapshot is not None:
        s = m.snapshot
        snap = [s.index, s.term, s.ctime, s.data if with_snapshot_data else b""]
    return [
        int(m.type),
        m.src,
        m.dst,
        m.term,
        m.log_term,
        m.index,
        [entry_to_wire(e) for e in m.entries],
        m.commit,
        m.reject,
        m.reject_hint,
        snap,
        m.context,
        m.force,
        m.ctime,
        m.wall,
    ]


def message_from_wire(v: Any) -> Message:
    if not isinstance(v, list) or len(v) != 15:
        raise DecodeError("message: expected a list of 15")
    try:
        mtype = MsgType(_int(v[0]))
    except ValueError:
        raise DecodeError(f"message: unknown type {v[0]}") from None
    entries = v[6]
    if not isinstance(entries, list):
        raise DecodeError("message: entries must be a list")
    snap = None
    if v[10] is not None:
        s = v[10]
        if not isinstance(s, list) or len(s) != 4:
            raise DecodeError("message: snapshot must be a list of 4")
        snap = Snapshot(_int(s[0]), _int(s[1]), _float(s[2]), _bytes(s[3]))
    if not isinstance(v[8], bool) or not isinstance(v[12], bool):
        raise DecodeError("message: reject and force must be booleans")
    return Message(
        type=mtype,
        src=_str(v[1]),
        dst=_str(v[2]),
        term=_int(v[3]),
        log_term=_int(v[4]),
        index=_int(v[5]),
        entries=tuple(entry_from_wire(e) for e in entries),
        commit=_int(v[7]),
        reject=v[8],
        reject_hint=_int(v[9]),
        snapshot=snap,
        context=_bytes(v[11]),
        force=v[12],
        ctime=_float(v[13]),
        wall=_float(v[14]),
    )
