"""Free TCP ports for the harness, reserved across processes until released.

A port is picked below the kernel's ephemeral range (32768 and up: the source ports of
outgoing connections, agents dialling each other and probes, come from there, so such a
connection cannot take a port chosen here before its server binds it), checked free by
binding it, and reserved with an exclusive `flock` on a per-port lock file that this
process keeps open. Every harness in this repository picks its ports here, so two test
workers, a chaos run and a benchmark on the same machine never pick the same port
between choosing it and binding it (seed 63 of a chaos run lost its start to that
race). A reservation ends with `release()` (a `LocalCluster` releases its ports when it
stops) or when the process exits, whichever comes first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

LOW, HIGH = 20000, 32000
_LOCK_DIR = Path(tempfile.gettempdir()) / f"controlplane-ports-{os.getuid()}"
_held: dict[int, int] = {}  # port -> the lock file's descriptor
_guard = threading.Lock()
_rng = random.SystemRandom()


def free_port(host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> int:
    """A port free now and reserved for this process (see the module docstring)."""
    excluded = set(exclude)
    _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for _ in range(500):
        port = _rng.randrange(LOW, HIGH)
        with _guard:
            if port in excluded or port in _held:
                continue
            fd = os.open(_LOCK_DIR / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process holds it
                os.close(fd)
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:  # taken by something that does not reserve
                    os.close(fd)
                    continue
            _held[port] = fd
            return port
    raise OSError(f"no free port found between {LOW} and {HIGH}")


def release(ports: Iterable[int]) -> None:
    """End this process's reservation of `ports` (those it does not hold are ignored)."""
    with _guard:
        for port in ports:
            fd = _held.pop(port, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def held() -> set[int]:
    """The ports this process holds now."""
    with _guard:
        return set(_held)
