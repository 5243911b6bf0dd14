"""One member's session with etcd: its lease, its contact with etcd, and leadership.

etcd has no election in its plain API (the Go client builds one in its `concurrency`
package; aetcd has none), so this is that recipe, kept small:

- The member holds one lease of `lease_ttl_s` and refreshes it every `heartbeat_s`. Its
  member key lives under it; when the lease runs out (the member crashed, froze, or lost
  etcd for longer than the TTL), etcd deletes the key, and with it everything else the
  member put under its lease. A lost lease is replaced by a new one at once.
- Every heartbeat also makes one linearizable read of the leader key. etcd answers it
  only with a quorum behind it, so its success is what `has_quorum` rests on; and the
  value read tells whether to campaign.
- To campaign is to create `P/leader` under the member's lease in a transaction that
  requires the key not to exist. The winner's term is the revision of that transaction,
  which is the key's create_revision: the fencing token that every decision's
  transaction compares. A member campaigns when the key is absent, at each heartbeat, and
  at once when the watch reports it deleted.
- `term` is this member's own belief that it leads. It is dropped as soon as the member
  learns otherwise (its lease is gone, or the leader key is not the one it created). It
  may outlive the leadership while the member is cut off or frozen; that is harmless,
  because etcd refuses a deposed leader's transaction whatever it believes.
- A member that finds the leader key holding its own id under another lease is looking
  at its own earlier run (it restarted within the TTL): it deletes that key (only that
  one, by create_revision) instead of waiting for the old lease to run out. Under its
  own lease, the key is a campaign it won whose answer was lost: it takes the term.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from controlplane.consensus.etcd_client import (
    EtcdClient,
    KeyValue,
    LeaseLost,
    create_revision_is,
    delete,
    get,
    lease_is,
    put,
)
from controlplane.consensus.etcd_view import Layout, dumps
from controlplane.errors import StoreError

log = logging.getLogger(__name__)


class Contact:
    """Whether this member is in touch with etcd: the basis of `has_quorum`.

    In touch means the last heartbeat succeeded less than `window_s` ago and the watch is
    live (so the local view is current). `lost_at` is the wall time that stopped being
    true, or None while it is true.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.reachable = False
        self.watch_live = False
        self.closed = False
        self.last_ok = float("-inf")
        self.lost_at: float | None = time.time()

    def ok(self) -> None:
        if not self.reachable:
            log.debug("in contact with etcd")
        self.last_ok = time.monotonic()
        self.reachable = True
        self.has_quorum()

    def failed(self) -> None:
        self.reachable = False
        self.has_quorum()

    def watching(self, live: bool) -> None:
        self.watch_live = live
        self.has_quorum()

    def has_quorum(self) -> bool:
        now = time.monotonic()
        has = not self.closed and self.reachable and self.watch_live and now - self.last_ok <= self.window_s
        if has:
            self.lost_at = None
        elif self.lost_at is None:
            self.lost_at = time.time()
        return has


class Session:
    """The lease, the heartbeat and the campaign of one member (see the module docstring)."""

    def __init__(
        self,
        client: EtcdClient,
        layout: Layout,
        contact: Contact,
        *,
        member_id: str,
        address: str,
        lease_ttl_s: int,
        heartbeat_s: float,
    ) -> None:
        self._client = client
        self._layout = layout
        self._contact = contact
        self.member_id = member_id
        self.address = address
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_s = heartbeat_s
        self.lease = 0
        self.term = 0
        self.last_term = 0
        self._lease_ok_at = float("-inf")
        self._wake = asyncio.Event()
        self.closed = False

    def lease_fresh(self) -> bool:
        """Whether etcd confirmed the lease within its TTL (so it cannot have expired)."""
        return self.lease != 0 and time.monotonic() - self._lease_ok_at < self.lease_ttl_s

    def wake(self) -> None:
        """Run a heartbeat (and campaign if nobody leads) now rather than at the next tick."""
        self._wake.set()

    def seen_leader(self, leader: KeyValue | None, applied_revision: int) -> None:
        """The watch shows `leader` as of `applied_revision`: drop a leadership that ended."""
        if leader is not None:
            self.last_term = max(self.last_term, leader.create_revision)
        # Only once the view has reached our own term can it tell us the term is over.
        if self.term and applied_revision >= self.term:
            self._check_term(leader)
        if leader is None:
            self.wake()

    def _check_term(self, leader: KeyValue | None) -> None:
        if self.term and (leader is None or leader.create_revision != self.term):
            log.warning("etcd member %s: no longer leader (term %d ended)", self.member_id, self.term)
            self.term = 0

    def lease_lost(self) -> None:
        if self.lease:
            log.warning("etcd member %s: its lease expired; its keys are gone", self.member_id)
        self.lease = 0
        self.term = 0
        self.wake()

    def deposed(self) -> None:
        """A transaction fenced on `term` was refused: that term is over."""
        self.term = 0

    # -- the loop ------------------------------------------------------------------------

    async def open(self) -> None:
        """Take a new lease and announce the member under it."""
        lease, _ = await self._client.grant(self.lease_ttl_s)
        member = dumps({"id": self.member_id, "address": self.address})
        try:
            await self._client.txn([], [put(self._layout.member(self.member_id), member, lease)])
        except StoreError:
            with contextlib.suppress(StoreError):
                await self._client.revoke(lease)
            raise
        self.lease = lease
        self._lease_ok_at = time.monotonic()

    async def run(self) -> None:
        """Heartbeat every `heartbeat_s` (or when woken) until cancelled."""
        while True:
            try:
                await self.beat()
            except LeaseLost:
                self.lease_lost()
            except StoreError as exc:
                if self._contact.reachable:
                    log.warning("etcd member %s: lost contact with etcd (%s)", self.member_id, exc)
                self._contact.failed()
            except Exception:
                log.exception("etcd member %s: heartbeat failed", self.member_id)
                self._contact.failed()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()

    async def beat(self) -> None:
        """Refresh (or replace) the lease, read the leader key, campaign if nobody leads."""
        if not self.lease:
            await self.open()
        elif await self._client.keepalive(self.lease) > 0:
            self._lease_ok_at = time.monotonic()
        else:
            self.lease_lost()
            await self.open()
        read = await self._client.txn([], [get(self._layout.leader)])
        if not self._contact.reachable:
            log.info("etcd member %s: in contact with etcd again", self.member_id)
        self._contact.ok()
        leader = read.first()
        if leader is not None:
            self.last_term = max(self.last_term, leader.create_revision)
        self._check_term(leader)
        if leader is not None and leader.value == self.member_id.encode():
            if leader.lease == self.lease and not self.term:
                # Won by this session, but the answer to the campaign was lost (a timeout):
                # nobody else holds this lease, so the term is ours.
                self.term = leader.create_revision
                log.info("etcd member %s: leader in term %d", self.member_id, self.term)
            elif leader.lease != self.lease:
                released = await self._client.txn(
                    [create_revision_is(self._layout.leader, leader.create_revision)],
                    [delete(self._layout.leader)],
                )
                if released.succeeded:
                    log.info("etcd member %s: released the leadership of its earlier run", self.member_id)
                leader = None
        if leader is None:
            await self.campaign()

    async def campaign(self) -> None:
        if not self.lease or self.closed:
            return
        key = self._layout.leader
        result = await self._client.txn(
            [create_revision_is(key, 0)], [put(key, self.member_id.encode(), self.lease)]
        )
        if result.succeeded:
            self.term = result.revision
            self.last_term = max(self.last_term, result.revision)
            log.info("etcd member %s: leader in term %d", self.member_id, result.revision)

    async def leave(self) -> None:
        """Resign (if leading) and drop the member key. The lease is left to run out, so
        the member's observations outlive a quick restart."""
        self.closed = True
        if not self.lease:
            return
        if self.term:
            await self._client.txn(
                [create_revision_is(self._layout.leader, self.term)], [delete(self._layout.leader)]
            )
            self.term = 0
        member = self._layout.member(self.member_id)
        await self._client.txn([lease_is(member, self.lease)], [delete(member)])
