"""The network side of the embedded Raft backend: who a peer is, where to dial it, when we heard it.

pysyncobj identifies a peer by the address it announces on connect, and only the peer
with the larger address dials. So a peer's identity must stay its Raft address even when
the bytes go somewhere else (a fault-injecting proxy in tests, a port forward in
production). `DialNode` keeps the identity and changes only where the socket connects.

`HeardTransport` records when each peer last sent us anything. That is what
`RaftStore.status()` calls "heard recently": a leader has quorum while a majority
answered it within the window, a follower while its leader spoke within it. pysyncobj's
own connection flags lag (a silent connection counts as up until `connectionTimeout`).

Everything here runs on pysyncobj's tick thread; `heard` is only read there too.
"""

from __future__ import annotations

import time
from typing import Any

from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.node import TCPNode
from pysyncobj.transport import TCPTransport


def split_address(address: str) -> tuple[str, int]:
    """`host:port` into its parts; ValueError when it is not that shape."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return host, int(port)


class DialNode(TCPNode):  # type: ignore[misc]  # pysyncobj has no type hints
    """A peer known by its Raft address `address`, reached by connecting to `dial`."""

    def __init__(self, address: str, dial: str) -> None:
        super().__init__(address)
        self._dial_host, self._dial_port = split_address(dial)

    @property
    def ip(self) -> str | None:
        # Only the dialling side reads `ip`/`port`; identity (`id`, `address`) is untouched.
        resolved: str | None = globalDnsResolver().resolve(self._dial_host)
        return resolved

    @property
    def port(self) -> int:
        return self._dial_port

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # pysyncobj pickles the member set into its snapshot file; store a plain node so
        # a snapshot never depends on this class or on a test's proxy address.
        return (TCPNode, (self.address,))


class HeardTransport(TCPTransport):  # type: ignore[misc]  # pysyncobj has no type hints
    """pysyncobj's TCP transport, noting the monotonic time of every message per peer."""

    def __init__(self, sync_obj: Any, self_node: Any, other_nodes: Any, *, heard: dict[str, float]) -> None:
        self._heard = heard
        super().__init__(sync_obj, self_node, other_nodes)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self._heard[node.id] = time.monotonic()
        super()._onMessageReceived(node, message)
