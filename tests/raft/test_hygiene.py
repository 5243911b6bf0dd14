"""What the engine must never do: unpickle, or pull in pysyncobj."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.raft import codec

PACKAGE = Path(__file__).resolve().parents[2] / "controlplane" / "raft"


def test_no_pickle_marshal_or_eval_in_the_package() -> None:
    pattern = re.compile(r"\b(pickle|cPickle|marshal|shelve|dill|eval|exec|__import__)\b")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_importing_the_engine_loads_neither_pysyncobj_nor_pickle_decoding() -> None:
    code = (
        "import sys; import controlplane.raft, controlplane.raft.node, controlplane.raft.transport, "
        "controlplane.raft.storage; "
        # (marshal is built into the interpreter's import system, so it is always loaded;
        # the grep above keeps the package from using it.)
        "banned = ('pysyncobj', 'pickle', '_pickle', 'shelve', 'dill'); "
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in banned)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = [m for m in out.stdout.strip().split(",") if m]
    assert loaded == []


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_a_decode_error_never_anything_else(seed: int) -> None:
    import random

    rng = random.Random(seed)
    for _ in range(500):
        blob = rng.randbytes(rng.randrange(1, 64))
        try:
            value = codec.unpackb(blob)
        except codec.DecodeError:
            continue
        try:
            codec.message_from_wire(value)
        except codec.DecodeError:
            continue


def test_msgpack_extension_types_are_refused() -> None:
    import msgpack  # type: ignore[import-untyped]

    blob = msgpack.packb(msgpack.ExtType(42, b"payload"))
    with pytest.raises(codec.DecodeError):
        codec.unpackb(blob)


def test_snapshot_chunks_reassemble_only_whole_and_verified() -> None:
    import zlib

    from controlplane.raft.chunks import Assembler, ChunkError, split

    data = bytes(range(256)) * 40
    crc = zlib.crc32(data)
    parts = list(split(data, 1000))
    asm = Assembler(max_bytes=1 << 20)
    results = [asm.add("b", (1, 5, 1), off, len(data), crc, chunk) for off, chunk in parts]
    assert results[:-1] == [None] * (len(parts) - 1) and results[-1] == data
    # A lost chunk drops the assembly; nothing is handed on.
    assert [asm.add("b", (1, 5, 1), off, len(data), crc, c) for off, c in parts if off != 2000] == [None] * (
        len(parts) - 1
    )
    with pytest.raises(ChunkError):
        for off, chunk in parts:
            asm.add("b", (1, 5, 1), off, len(data), crc ^ 1, chunk)
    with pytest.raises(ValueError, match="over the"):
        Assembler(max_bytes=10).add("b", (1, 5, 1), 0, 11, 0, b"x")
