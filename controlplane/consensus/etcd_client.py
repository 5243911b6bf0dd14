"""The part of etcd's v3 API the etcd backend uses, on aetcd's generated gRPC stubs.

Why not aetcd's `Client` itself (aetcd 1.0.0, read and tried):

- it only opens plaintext channels, so TLS is impossible through it;
- `transaction()` drops the response header, and with it the revision the transaction
  applied at: that revision is the leader's term, and what read-your-writes waits for;
- its watch hands over events one at a time, losing the response boundaries; a watch
  response is the unit in which etcd delivers whole revisions (all the events of one
  transaction arrive together), which is what keeps half a transaction out of a snapshot;
- it talks to one endpoint and does not re-authenticate when etcd forgets the token
  (etcd keeps simple tokens in memory, so every etcd restart invalidates them).

So this module keeps aetcd's protobuf messages and stubs (`aetcd.rpc`, generated from
etcd's own `.proto` files) and adds what the backend needs:

- TLS (CA, client certificate) and username/password, re-authenticating once when etcd
  says the token is no longer valid;
- several endpoints: after a connection-level failure the next call goes to the next one
  (a single endpoint keeps its channel, which gRPC reconnects by itself, quickly: the
  reconnect backoff is capped at one second);
- a timeout on every call (`asyncio.timeout` around connect plus call), and errors mapped
  onto the store's: unreachable or too slow -> `NoQuorum`, a lease etcd no longer has ->
  `LeaseLost`, anything else -> `StoreError`;
- a watch that yields whole responses, answers progress requests, and reports the end of
  its stream as an error, so its owner resynchronises instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
from aetcd import rpc

from controlplane.errors import NoQuorum, StoreError

log = logging.getLogger(__name__)

# Channel options. etcd refuses client pings more often than every 5 s (its
# --grpc-keepalive-min-time), so 10 s; a silent connection is then dropped after the
# ping timeout. The reconnect backoff cap keeps an etcd restart from costing minutes.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_WATCH_QUEUE = 64
_WATCH_REQUESTS = 8


class LeaseLost(StoreError):
    """etcd no longer has the lease: it expired, and every key under it is gone."""

    code = "lease_lost"


class WatchLost(NoQuorum):
    """The watch stream ended or was cancelled by etcd; resynchronise and watch again."""


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Files for TLS to etcd: the CA that signed etcd's certificate, and a client pair."""

    ca_file: pathlib.Path | None = None
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None

    def problems(self, path: str = "backend.etcd.tls") -> list[str]:
        out: list[str] = []
        for name in ("ca_file", "cert_file", "key_file"):
            file = getattr(self, name)
            if file is not None and not pathlib.Path(file).is_file():
                out.append(f"{path}.{name}: not a readable file (got {str(file)!r})")
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            out.append(f"{path}.{missing}: required with the other half of the client pair (got nothing)")
        return out

    def credentials(self) -> Any:
        def read(file: pathlib.Path | None) -> bytes | None:
            return None if file is None else pathlib.Path(file).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one key; for a deletion `kv.mod_revision` is the deletion's revision."""

    kv: KeyValue
    deleted: bool


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: every event of the revisions it covers, or none (progress)."""

    revision: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the transaction (its own, if it wrote)
    ranges: tuple[tuple[KeyValue, ...], ...]  # one per range operation of the branch taken

    def first(self, index: int = 0) -> KeyValue | None:
        found = self.ranges[index] if index < len(self.ranges) else ()
        return found[0] if found else None


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=bytes(pb.key),
        value=bytes(pb.value),
        create_revision=int(pb.create_revision),
        mod_revision=int(pb.mod_revision),
        lease=int(pb.lease),
    )


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with `prefix`."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


# -- operation and comparison builders ---------------------------------------------------


def put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def get_prefix(prefix: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)))


def delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def create_revision_is(key: bytes, revision: int) -> Any:
    """True when `key`'s create_revision is `revision` (0: the key does not exist)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=revision)


def mod_revision_is(key: bytes, revision: int) -> Any:
    """True when `key` was last written at `revision` (0: the key does not exist)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=revision)


def value_is(key: bytes, value: bytes) -> Any:
    """True when `key` exists and holds exactly `value`."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=key, value=value)


def missing(key: bytes) -> Any:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=key, version=0)


def lease_is(key: bytes, lease: int) -> Any:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.LEASE, key=key, lease=lease)


# -- endpoints ---------------------------------------------------------------------------


def parse_endpoint(text: str) -> tuple[str, bool]:
    """(`host:port`, whether the URL asked for TLS) from `http(s)://host:port` or `host:port`."""
    secure = text.startswith("https://")
    target = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be [http[s]://]host:port (got {text!r})")
    return target, secure


@dataclass(slots=True)
class _Connection:
    target: str
    channel: Any
    kv: Any
    lease: Any
    watch: Any
    metadata: tuple[tuple[str, str], ...] | None


class EtcdClient:
    """Calls to etcd, each with a timeout, over one channel at a time (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float,
        tls: EtcdTls | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        parsed = [parse_endpoint(e) for e in endpoints]
        if not parsed:
            raise ValueError("at least one etcd endpoint is needed")
        self._targets = [target for target, _ in parsed]
        self._secure = tls is not None or any(secure for _, secure in parsed)
        self._tls = tls or EtcdTls()
        self.timeout_s = timeout_s
        self._username = username
        self._password = password
        self._index = 0
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to."""
        return self._targets[self._index]

    # -- connection ----------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None:
            return conn
        async with self._connecting:
            if self._closed:
                raise StoreError("the etcd client is closed")
            if self._conn is not None:
                return self._conn
            target = self._targets[self._index]
            if self._secure:
                channel = rpc.secure_channel(target, self._tls.credentials(), options=_CHANNEL_OPTIONS)
            else:
                channel = rpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
            metadata = None
            try:
                if self._username is not None:
                    reply = await rpc.AuthStub(channel).Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password or ""),
                        timeout=self.timeout_s,
                    )
                    metadata = (("token", str(reply.token)),)
            except BaseException:
                self._close_later(channel)
                raise
            self._conn = _Connection(
                target=target,
                channel=channel,
                kv=rpc.KVStub(channel),
                lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel),
                metadata=metadata,
            )
            return self._conn

    def _drop(self, conn: _Connection | None, *, next_endpoint: bool) -> None:
        """Forget `conn` (if still current) so that the next call opens a new channel.

        The old channel is closed with a grace period longer than any call's deadline:
        closing a gRPC channel cancels the calls still on it, and other tasks may have
        calls there that would otherwise see a bare `CancelledError`.
        """
        if conn is None or self._conn is not conn:
            return
        self._conn = None
        if next_endpoint:
            self._index = (self._index + 1) % len(self._targets)
        self._close_later(conn.channel, grace_s=self.timeout_s + 1.0)

    def _close_later(self, channel: Any, grace_s: float | None = None) -> None:
        task = asyncio.ensure_future(channel.close(grace=grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _failed(self, conn: _Connection | None, exc: BaseException) -> StoreError:
        """Map a failure onto the store's errors; move to the next endpoint if that may help.

        With one endpoint the channel is kept: gRPC reconnects it by itself.
        """
        where = conn.target if conn is not None else self.endpoint
        several = len(self._targets) > 1
        if isinstance(exc, TimeoutError):
            if several:
                self._drop(conn, next_endpoint=True)
            return NoQuorum(f"etcd at {where} did not answer within {self.timeout_s:g} s")
        if isinstance(exc, asyncio.CancelledError):
            return NoQuorum(f"the call to etcd at {where} was cancelled (its channel closed)")
        if isinstance(exc, grpc.aio.AioRpcError):
            code, details = exc.code(), exc.details() or ""
            if code in _UNREACHABLE:
                if several:
                    self._drop(conn, next_endpoint=True)
                return NoQuorum(f"etcd at {where} is unreachable ({code.name})", details)
            if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
                return LeaseLost("etcd no longer has this member's lease", details)
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self._drop(conn, next_endpoint=False)
                return StoreError(f"etcd at {where} refused the request ({code.name})", details)
            return StoreError(f"etcd at {where} failed the request ({code.name})", details)
        return StoreError(f"etcd at {where} failed the request", repr(exc))

    async def _call(self, name: str, do: Any) -> Any:
        """Run `do(connection)` within the timeout, and try again at once when that can help.

        Again once when etcd says our token is no longer valid (it forgot it), and on the
        next endpoint when this one refused the connection outright; never after a
        timeout, which has used up the caller's time.
        """
        reauthenticated = False
        endpoints_left = len(self._targets) - 1
        while True:
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    conn = await self._connection()
                    return await do(conn)
            except asyncio.CancelledError as exc:
                if _really_cancelled():
                    raise
                error = self._failed(conn, exc)
                log.debug("etcd %s failed: %s", name, error)
                raise error from None
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                error = self._failed(conn, exc)
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                if (
                    code == grpc.StatusCode.UNAUTHENTICATED
                    and self._username is not None
                    and not reauthenticated
                    and "invalid auth token" in (exc.details() or "")  # type: ignore[union-attr]
                ):
                    reauthenticated = True
                    continue
                if code == grpc.StatusCode.UNAVAILABLE and endpoints_left > 0:
                    endpoints_left -= 1
                    continue
                log.debug("etcd %s failed: %s", name, error)
                raise error from None

    async def close(self) -> None:
        """Close the channel; calls in flight fail with `NoQuorum`."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_later(conn.channel)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- calls ---------------------------------------------------------------------------

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> TxnResult:
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))

        async def do(conn: _Connection) -> TxnResult:
            reply = await conn.kv.Txn(request, timeout=self.timeout_s, metadata=conn.metadata)
            ranges = tuple(
                tuple(_kv(kv) for kv in op.response_range.kvs)
                for op in reply.responses
                if op.WhichOneof("response") == "response_range"
            )
            return TxnResult(bool(reply.succeeded), int(reply.header.revision), ranges)

        result: TxnResult = await self._call("txn", do)
        return result

    async def range_prefix(self, prefix: bytes) -> tuple[int, tuple[KeyValue, ...]]:
        """(revision, every key under `prefix`), read linearizably."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))

        async def do(conn: _Connection) -> tuple[int, tuple[KeyValue, ...]]:
            reply = await conn.kv.Range(request, timeout=self.timeout_s, metadata=conn.metadata)
            return int(reply.header.revision), tuple(_kv(kv) for kv in reply.kvs)

        result: tuple[int, tuple[KeyValue, ...]] = await self._call("range", do)
        return result

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (id, TTL granted; etcd may raise a short one to its minimum)."""

        async def do(conn: _Connection) -> tuple[int, int]:
            reply = await conn.lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl_s), timeout=self.timeout_s, metadata=conn.metadata
            )
            if reply.error:
                raise StoreError("etcd refused a lease", str(reply.error))
            return int(reply.ID), int(reply.TTL)

        result: tuple[int, int] = await self._call("grant", do)
        return result

    async def keepalive(self, lease: int) -> int:
        """Refresh `lease` once; returns its TTL, 0 when etcd no longer has it."""

        async def do(conn: _Connection) -> int:
            call = conn.lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout_s, metadata=conn.metadata
            )
            try:
                async for reply in call:
                    return int(reply.TTL)
                return 0
            finally:
                call.cancel()

        result: int = await self._call("keepalive", do)
        return result

    async def revoke(self, lease: int) -> None:
        async def do(conn: _Connection) -> None:
            await conn.lease.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout_s, metadata=conn.metadata
            )

        await self._call("revoke", do)

    def watch(self, prefix: bytes, start_revision: int) -> Watch:
        return Watch(self, prefix, start_revision)


def _really_cancelled() -> bool:
    """Whether the current task is being cancelled, as opposed to gRPC raising
    `CancelledError` for a call whose channel was closed under it."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class Watch:
    """One watch stream over every key under `prefix`, from `start_revision` on.

    Use as `async with client.watch(...) as w:` then `await w.next()` for each response.
    A reader task moves responses from the gRPC stream into a bounded queue, so a caller
    can wait with a timeout without cancelling the stream itself.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int) -> None:
        self._client = client
        self._prefix = prefix
        self._start_revision = start_revision
        self._requests: asyncio.Queue[Any] = asyncio.Queue(maxsize=_WATCH_REQUESTS)
        self._responses: asyncio.Queue[WatchBatch | BaseException] = asyncio.Queue(maxsize=_WATCH_QUEUE)
        self._created = asyncio.Event()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None

    async def __aenter__(self) -> Watch:
        client = self._client
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=self._prefix, range_end=prefix_end(self._prefix), start_revision=self._start_revision
            )
        )
        self._requests.put_nowait(create)
        try:
            async with asyncio.timeout(client.timeout_s):
                self._conn = await client._connection()
                self._call = self._conn.watch.Watch(self._requests_iter(), metadata=self._conn.metadata)
                self._reader = asyncio.create_task(self._read(), name="etcd-watch-reader")
                await self._created.wait()
        except BaseException as exc:
            await self._close()
            if isinstance(exc, TimeoutError | grpc.aio.AioRpcError):
                raise client._failed(self._conn, exc) from None
            raise
        # The reader may have failed right after `created` (a compacted start revision).
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _requests_iter(self) -> AsyncIterator[Any]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def _read(self) -> None:
        error: BaseException
        try:
            async for reply in self._call:
                if reply.created:
                    self._created.set()
                if reply.canceled or reply.compact_revision:
                    reason = reply.cancel_reason or f"compacted at {reply.compact_revision}"
                    error = WatchLost("etcd cancelled the watch", str(reason))
                    break
                if reply.created and not reply.events:
                    continue
                events = tuple(Event(_kv(e.kv), e.type == rpc.Event.DELETE) for e in reply.events)
                await self._responses.put(WatchBatch(int(reply.header.revision), events))
            else:
                error = WatchLost("the watch stream ended")
        except grpc.aio.AioRpcError as exc:
            error = self._client._failed(self._conn, exc)
        except asyncio.CancelledError as exc:
            if _really_cancelled():
                raise
            error = self._client._failed(self._conn, exc)
        except Exception as exc:
            error = WatchLost("the watch stream failed", repr(exc))
        self._created.set()  # wake __aenter__, which then finds the error
        await self._responses.put(error)

    def request_progress(self) -> None:
        """Ask etcd for a progress response (the current revision, no events)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    async def next(self) -> WatchBatch:
        """The next response; raises `NoQuorum`/`WatchLost` when the stream is over."""
        item = await self._responses.get()
        if isinstance(item, BaseException):
            self._responses.put_nowait(item)  # every later call fails the same way
            raise item
        return item

    async def _close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self._requests.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
