"""Lease renewals over one LeaseKeepAlive stream, the way etcd's own clients renew.

Every heartbeat renews its instance's etcd lease. Through the HTTP/JSON gateway each
renewal was an HTTP request that opened a stream of its own inside etcd: the largest
cost of the registry, and of etcd, at a thousand instances. ``Keepalives`` instead
keeps one gRPC stream to one member (``protos/etcd_lease.proto``) and writes each
renewal to it as a message: a request is matched to its reply by lease id, in order.

The stream asks etcd to require a leader (the ``hasleader`` metadata etcd's clients
send): a member cut off from its cluster cannot renew a lease, and with it etcd ends
the stream, rather than leaving renewals unanswered, so they move to another member.
A renewal that fails on a member (the stream broke, or no reply within ``timeout``)
is tried on the next, each member once per call, like the gateway's calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc

from protos import etcd_lease_pb2 as pb
from protos import etcd_lease_pb2_grpc as pb_grpc
from registry_service.etcd.transport import EtcdUnavailable, LeaseNotFound
from shoal_core.lifecycle import stop_task

__all__ = ["Keepalives"]

logger = logging.getLogger(__name__)

# etcd's require-leader metadata (rpctypes.MetadataRequireLeaderKey and its value).
REQUIRE_LEADER = (("hasleader", "true"),)
OPTIONS = [
    # A renewal is a few dozen bytes; the cap only stops a runaway reply.
    ("grpc.max_receive_message_length", 1 << 20),
    # A stream that failed is replaced by a new channel, which must try to connect at
    # once: from the process-wide pool it would inherit the old one's reconnect backoff.
    ("grpc.use_local_subchannel_pool", 1),
]


class _Broken(Exception):
    """The stream to this member failed; another member may answer."""


class _Stream:
    """One LeaseKeepAlive stream to one member, and the renewals waiting on it."""

    def __init__(self, endpoint: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.endpoint = endpoint
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(endpoint, options=OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(endpoint, credentials, options=OPTIONS)
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self.broken: _Broken | None = None
        stub = pb_grpc.LeaseStub(self._channel)
        self._call = stub.LeaseKeepAlive(self._requests(), metadata=REQUIRE_LEADER)
        self._reader = asyncio.create_task(self._read(), name=f"etcd-keepalive-{endpoint}")

    async def _requests(self) -> AsyncIterator[pb.LeaseKeepAliveRequest]:
        while True:
            yield pb.LeaseKeepAliveRequest(ID=await self._queue.get())

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                waiters = self._waiting.get(reply.ID)
                if waiters:  # else its caller gave up waiting
                    waiter = waiters.popleft()
                    if not waiters:
                        del self._waiting[reply.ID]
                    if not waiter.done():
                        waiter.set_result(reply.TTL)
            self._fail(_Broken("etcd ended the stream"))
        except grpc.aio.AioRpcError as exc:
            self._fail(_Broken(f"{exc.code().name}: {exc.details()}"))
        except asyncio.CancelledError:
            self._fail(_Broken("the stream was closed"))
            raise

    def _fail(self, error: _Broken) -> None:
        self.broken = error
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        self._waiting.clear()

    async def renew(self, lease: int, timeout: float) -> int:
        """The lease's TTL after renewing it; 0 when etcd has no such lease."""
        if self.broken is not None:
            raise self.broken
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease, deque()).append(waiter)
        self._queue.put_nowait(lease)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise _Broken(f"no renewal within {timeout:g}s") from None
        finally:
            waiters = self._waiting.get(lease)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[lease]

    async def aclose(self) -> None:
        self._call.cancel()
        await stop_task(self._reader)
        await self._channel.close(None)


class Keepalives:
    """Renews etcd leases over one stream to one of ``endpoints`` at a time."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._timeout = timeout
        self._credentials = credentials
        self._current = 0
        self._stream: _Stream | None = None

    async def renew(self, lease: int) -> int:
        """Renew ``lease`` and return its TTL; ``LeaseNotFound`` once it has ended,
        ``EtcdUnavailable`` when no member renews it."""
        failures = []
        for _ in self._endpoints:
            stream = self._open()
            try:
                ttl = await stream.renew(lease, self._timeout)
            except _Broken as exc:
                failures.append(f"{stream.endpoint}: {exc}")
                await self._drop(stream)
                continue
            if ttl <= 0:
                raise LeaseNotFound(f"lease {lease:x} has expired or does not exist", 5)
            return ttl
        raise EtcdUnavailable(
            f"no etcd endpoint renewed lease {lease:x} ({', '.join(self._endpoints)}); "
            f"last: {failures[-1]}"
        )

    def _open(self) -> _Stream:
        if self._stream is None:
            self._stream = _Stream(self._endpoints[self._current], self._credentials)
        return self._stream

    async def _drop(self, stream: _Stream) -> None:
        """Close a failed stream and move to the next member (once per failure: the
        other renewals that saw the same stream fail find it gone already)."""
        if self._stream is not stream:
            return
        self._stream = None
        self._current = (self._current + 1) % len(self._endpoints)
        logger.warning(
            "etcd: lease renewals move from %s to %s (%s)",
            stream.endpoint,
            self._endpoints[self._current],
            stream.broken or "no reply",
        )
        await stream.aclose()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()
