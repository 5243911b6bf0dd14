"""What makes an agent's memory and tasks diagnosable in production, at no cost when unused.

- `AllocationTracer`: with `CONTROLPLANE_TRACEMALLOC=<frames>` in the environment the
  agent starts `tracemalloc` (keeping that many frames per allocation, 1-64) and takes a
  first snapshot; each `SIGUSR2` then logs the top `top` allocation differences since the
  previous snapshot (or the first), by source line, and keeps the new one. An operator
  who sees RSS grow sends SIGUSR2 twice, some minutes apart, and reads the log: the
  lines that grew are the leak. Off (no overhead) when the variable is unset or 0.

The rest of the picture is on /metrics (`metrics.py`): `controlplane_asyncio_tasks`,
the `process_*` series and `controlplane_build_info`.

The comparison and the snapshot are CPU work under the GIL; `run()` does it on a worker
thread, one at a time (a second SIGUSR2 during a dump is merged into the next one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tracemalloc
from collections.abc import Mapping

from controlplane.errors import ConfigError

log = logging.getLogger(__name__)

TRACEMALLOC_ENV = "CONTROLPLANE_TRACEMALLOC"
MAX_FRAMES = 64
# tracemalloc's own and the import system's allocations are noise in a leak hunt.
_NOISE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


class AllocationTracer:
    """tracemalloc for one process; see the module docstring."""

    def __init__(self, frames: int, top: int = 25) -> None:
        if not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"frames must be 1-{MAX_FRAMES} (got {frames})")
        self.frames = frames
        self.top = top
        self._last: tracemalloc.Snapshot | None = None
        self._requested = asyncio.Event()
        self._started_here = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AllocationTracer | None:
        """The tracer `CONTROLPLANE_TRACEMALLOC` asks for, or None; `ConfigError` if malformed."""
        raw = environ.get(TRACEMALLOC_ENV, "").strip()
        if raw in ("", "0"):
            return None
        try:
            frames = int(raw)
        except ValueError:
            frames = -1
        if not 1 <= frames <= MAX_FRAMES:
            raise ConfigError(
                [f"{TRACEMALLOC_ENV}: expected a number of frames 1-{MAX_FRAMES} (got {raw!r})"]
            )
        return cls(frames)

    def start(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
            self._started_here = True
        self._last = self._snapshot()
        log.info(
            "tracemalloc on (%d frames); send SIGUSR2 to log the top %d allocation differences",
            self.frames,
            self.top,
        )

    def stop(self) -> None:
        self._last = None
        if self._started_here:
            tracemalloc.stop()
            self._started_here = False

    def request(self) -> None:
        """Ask for a dump (safe from a signal handler on the loop that runs `run()`)."""
        self._requested.set()

    async def run(self) -> None:
        """Dump once per request, on a worker thread, until cancelled."""
        while True:
            await self._requested.wait()
            self._requested.clear()
            await asyncio.to_thread(self.dump)

    def dump(self) -> list[str]:
        """Log (and return) the top differences since the previous snapshot; keep the new one."""
        if not tracemalloc.is_tracing():
            return []
        snapshot = self._snapshot()
        previous = self._last or snapshot
        self._last = snapshot
        stats = snapshot.compare_to(previous, "lineno")
        current, peak = tracemalloc.get_traced_memory()
        lines = [
            f"tracemalloc: {current / 2**20:.1f} MiB traced (peak {peak / 2**20:.1f} MiB); "
            f"top {self.top} differences since the previous snapshot:"
        ]
        for stat in stats[: self.top]:
            frame = stat.traceback[0]
            lines.append(
                f"  {frame.filename}:{frame.lineno}: {stat.size_diff / 1024:+.1f} KiB "
                f"({stat.size / 1024:.1f} KiB now), {stat.count_diff:+d} blocks"
            )
        log.warning("%s", "\n".join(lines))
        return lines

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(_NOISE)
