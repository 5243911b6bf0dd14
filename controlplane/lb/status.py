"""What an adapter reports about itself: log lines, an optional JSON status file, the agents.

The status file is written atomically (temporary file, then rename) after every
attempt, so a monitoring check or a test can read it at any moment and see whether the
last decision reached the load balancer, which revision is in force, and the error when
it is not. `applied_at` is when the revision in `applied_revision` was applied (set
here, when that revision changes, so both adapters mean the same by it).

Every update is also handed to the listeners (`listen`): the reporter
(`controlplane.lb.report`) that tells the agents. A listener must not block: it is
called inside the adapter's apply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
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
        self.adapter = adapter
        self.data: dict[str, Any] = {"adapter": adapter, "ok": None, "pid": os.getpid()}
        self._listeners: list[Callable[[Mapping[str, Any]], None]] = []

    def listen(self, listener: Callable[[Mapping[str, Any]], None]) -> None:
        """Call `listener(data)` after every update (and once now)."""
        self._listeners.append(listener)
        listener(self.data)

    def update(self, **fields: Any) -> None:
        now = time.time()
        if fields.get("applied_revision") and self._newly_applied(fields):
            fields["applied_at"] = now
        self.data.update(fields)
        self.data["updated_at"] = now
        for listener in self._listeners:
            listener(self.data)
        if self.path is None:
            return
        try:
            write_atomic(self.path, orjson.dumps(self.data, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            log.error("cannot write the status file %s: %s", self.path, e)

    def _newly_applied(self, fields: Mapping[str, Any]) -> bool:
        """Whether `fields` name another applied revision (or epoch) than the one in force."""
        before = (self.data.get("applied_revision"), self.data.get("applied_epoch"))
        after = (fields["applied_revision"], fields.get("applied_epoch", before[1]))
        return after != before
