"""The transport against a real listening node: hostile frames, idle sockets, wrong secrets."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from controlplane.raft import codec
from controlplane.raft.settings import RaftTimings
from controlplane.raft.transport import split_host_port
from tests.raft.harness import SECRET, LocalCluster, wait_for

TIMINGS = RaftTimings(
    election_timeout_min_s=0.3,
    election_timeout_max_s=0.6,
    heartbeat_s=0.05,
    handshake_timeout_s=0.5,
    idle_timeout_s=1.0,
    keepalive_s=0.2,
)
_LEN = struct.Struct(">I")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(address: str) -> socket.socket:
    s = socket.create_connection(split_host_port(address), timeout=5)
    return s


def closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the peer closes (EOF or reset) within `seconds`, ignoring what it sends."""
    s.settimeout(0.1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def read_preauth(s: socket.socket) -> object:
    (n,) = _LEN.unpack(s.recv(4, socket.MSG_WAITALL))
    return codec.unpackb(s.recv(n, socket.MSG_WAITALL))


def authenticate(address: str, claimed: str, to: str, secret: bytes = SECRET) -> tuple[socket.socket, bytes]:
    """Dial as `claimed` and complete the handshake; returns the socket and session key."""
    key = hmac.new(secret, b"controlplane raft v1 cluster key", hashlib.sha256).digest()
    s = connect(address)
    nonce_d = os.urandom(32)
    hello = codec.packb(["hello", 1, claimed, to, nonce_d])
    s.sendall(_LEN.pack(len(hello)) + hello)
    challenge = read_preauth(s)
    assert isinstance(challenge, list) and challenge[0] == "challenge"
    transcript = nonce_d + challenge[1] + claimed.encode() + b"\0" + to.encode()
    auth = codec.packb(["auth", hmac.new(key, b"dialer" + transcript, hashlib.sha256).digest()])
    s.sendall(_LEN.pack(len(auth)) + auth)
    assert read_preauth(s) == ["ok"]
    return s, hmac.new(key, b"session" + transcript, hashlib.sha256).digest()


@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    c = LocalCluster(tmp_path, timings=TIMINGS).start_all()
    yield c  # type: ignore[misc]
    c.close()


def test_huge_unauthenticated_frame_is_dropped_at_once(cluster: LocalCluster) -> None:
    cluster.leader()
    node = cluster.nodes["a"]
    before_rss = rss_bytes()
    before_tick = node.status().ticked_at
    s = connect(cluster.peers["a"])
    try:
        s.sendall(b"\x7f\xff\xff\xff")
        with pytest.raises(OSError):
            for _ in range(64):  # up to 64 MiB of zeros: the node must not buffer them
                s.sendall(b"\0" * (1 << 20))
        assert closed_within(s, 2.0)
    finally:
        s.close()
    wait_for("ticking", lambda: node.status().ticked_at > before_tick)
    assert rss_bytes() - before_rss < 16 << 20
    wait_for("bad frame counted", lambda: node.status().counters["transport_bad_frames"] >= 1)
    assert cluster.nodes[cluster.leader()].propose(b"still working").result(10) == 1


def test_silent_connection_is_closed_after_the_handshake_timeout(cluster: LocalCluster) -> None:
    s = connect(cluster.peers["a"])
    try:
        t0 = time.monotonic()
        assert closed_within(s, 5.0)
        assert time.monotonic() - t0 >= TIMINGS.handshake_timeout_s * 0.8
    finally:
        s.close()


def test_idle_authenticated_connection_is_closed_after_the_idle_timeout(cluster: LocalCluster) -> None:
    # We claim to be "b" (knowing the secret); the real b is stopped so it does not
    # replace our connection.
    cluster.stop("b")
    s, _session = authenticate(cluster.peers["a"], "b", "a")
    try:
        t0 = time.monotonic()
        assert closed_within(s, 10.0)
        took = time.monotonic() - t0
        assert took >= TIMINGS.idle_timeout_s * 0.8, took
    finally:
        s.close()
    wait_for("idle close counted", lambda: cluster.nodes["a"].status().counters["transport_idle_closed"] >= 1)


def test_forged_frame_after_authentication_closes_the_connection(cluster: LocalCluster) -> None:
    cluster.stop("b")
    s, _session = authenticate(cluster.peers["a"], "b", "a")
    try:
        body = b"\x00" + codec.packb([0, []])
        s.sendall(_LEN.pack(len(body) + 16) + body + b"\0" * 16)  # wrong MAC
        assert closed_within(s, 3.0)
    finally:
        s.close()
    wait_for("bad frame counted", lambda: cluster.nodes["a"].status().counters["transport_bad_frames"] >= 1)


def test_hundreds_of_idle_connections_do_not_lock_peers_out(cluster: LocalCluster) -> None:
    cluster.leader()
    flood = []
    try:
        for _ in range(300):
            try:
                flood.append(connect(cluster.peers["a"]))
            except OSError:
                break
        # b restarts during the flood: it must get through to a again.
        cluster.stop("b")
        b = cluster.start("b")
        wait_for(
            "b reconnected to a", lambda: any(m.id == "a" and m.connected_out for m in b.status().members)
        )
        wait_for("b fresh", lambda: b.status().fresh, timeout_s=15)
        assert b.propose(b"through the flood").result(10) >= 1
        assert cluster.nodes["a"].status().counters["transport_unauthenticated_evicted"] > 0
    finally:
        for s in flood:
            s.close()


def test_wrong_secret_is_logged_on_both_sides(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "controlplane.raft.transport")
    with LocalCluster(
        tmp_path, ids=("a", "b"), timings=TIMINGS, secrets={"b": b"a-different-secret-0123456789"}
    ) as c:
        c.start_all()

        def both_logged() -> bool:
            text = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            dialer = any("rejected our cluster secret or does not know it" in t for t in text)
            listener = any("failed authentication: wrong cluster secret" in t for t in text)
            return dialer and listener

        wait_for("both sides to log the wrong secret", both_logged, timeout_s=10)
        lines = [r.getMessage() for r in caplog.records if "secret" in r.getMessage()]
        assert any("raft peer a at 127.0.0.1" in t for t in lines)  # b dialling a
        assert any("claiming to be b failed authentication" in t for t in lines)  # a's side
        # Rate-limited: a couple of lines per side, not one per retry.
        time.sleep(2)
        assert len([r for r in caplog.records if "secret" in r.getMessage()]) <= 8
        assert c.nodes["a"].status().role != "leader" or c.nodes["b"].status().leader is None
