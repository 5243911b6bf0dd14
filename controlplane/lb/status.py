"""What an adapter reports about itself: log lines and an optional JSON status file.

The status file is written atomically (temporary file, then rename) after every
attempt, so a monitoring check or a test can read it at any moment and see whether the
last decision reached the load balancer, which revision is in force, and the error when
it is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StatusFile:
    """Keeps the adapter's status as a dict and mirrors it to `path` when given."""

    def __init__(self, path: Path | None, adapter: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"adapter": adapter, "ok": None, "pid": os.getpid()}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        if self.path is None:
            return
        try:
            write_atomic(self.path, orjson.dumps(self.data, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            log.error("cannot write the status file %s: %s", self.path, e)
