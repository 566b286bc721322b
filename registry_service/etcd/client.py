"""``EtcdClient``: keys, transactions, leases, watches and cluster status over the gateway."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from types import TracebackType

from registry_service.etcd.keepalive import Keepalives
from registry_service.etcd.model import (
    Compare,
    Delete,
    Json,
    KeyValue,
    Lease,
    Member,
    Op,
    Put,
    Range,
    Status,
    TxnResult,
    WatchEvent,
    WatchProgress,
    key_range,
    num,
    op_result,
    op_to_json,
)
from registry_service.etcd.tls import EtcdTls
from registry_service.etcd.transport import (
    Compacted,
    EtcdError,
    LeaseNotFound,
    Transport,
)

__all__ = ["MAX_TXN_OPS", "EtcdClient"]

# etcd's --max-txn-ops default: the most operations one transaction may hold.
MAX_TXN_OPS = 128


class EtcdClient:
    """An async etcd v3 client over the HTTP/JSON gateway of ``endpoints`` ("host:port").

    Plain HTTP, or HTTPS when ``tls`` is given (its CA, and a client certificate if etcd
    asks for one). Lease renewals go over gRPC instead (``Keepalives``), to the same
    ports with the same TLS. ``timeout`` bounds every call, failover included per
    endpoint; only a watch's wait for its next event is unbounded unless it is given
    ``idle_timeout``.
    Use as ``async with``, or call ``aclose``.
    """

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 2.0, tls: EtcdTls | None = None
    ) -> None:
        self._transport = Transport(endpoints, timeout, tls.ssl_context() if tls else None)
        credentials = tls.grpc_credentials() if tls else None
        self._keepalives = Keepalives(endpoints, timeout, credentials)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._transport.endpoints

    @property
    def endpoint(self) -> str:
        """The endpoint that answered last, where the next call goes first."""
        return self._transport.current

    async def aclose(self) -> None:
        await self._keepalives.aclose()
        await self._transport.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # Keys

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; return the revision of the change."""
        reply = await self._transport.call("/v3/kv/put", Put(key, value, lease).to_json())
        return _revision(reply)

    async def get(self, key: bytes) -> KeyValue | None:
        reply = await self._transport.call("/v3/kv/range", Range(key).to_json())
        kvs = reply.get("kvs", ())
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def range_prefix(
        self, prefix: bytes, *, revision: int = 0, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` in key order (the first ``limit``; 0: all) as of
        ``revision`` (0: now), and the revision they are as of: watch from it + 1."""
        body = {**key_range(prefix, True), "revision": str(revision), "limit": str(limit)}
        reply = await self._transport.call("/v3/kv/range", body)
        return [KeyValue.from_json(kv) for kv in reply.get("kvs", ())], _revision(reply)

    async def count_changed(self, prefix: bytes, after: int) -> int:
        """How many keys under ``prefix`` changed after revision ``after`` (a read by
        quorum, so a member cut off from its cluster cannot answer it)."""
        body = {**key_range(prefix, True), "count_only": True, "min_mod_revision": str(after + 1)}
        return num(await self._transport.call("/v3/kv/range", body), "count")

    async def delete(self, key: bytes) -> int:
        """Delete ``key``; return how many keys went (0 or 1)."""
        return await self._delete(Delete(key))

    async def delete_prefix(self, prefix: bytes) -> int:
        """Delete every key under ``prefix``; return how many went."""
        return await self._delete(Delete(prefix, prefix=True))

    async def _delete(self, op: Delete) -> int:
        return num(await self._transport.call("/v3/kv/deleterange", op.to_json()), "deleted")

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Run ``success`` if every compare holds, else ``failure``, atomically."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op_to_json(op) for op in success],
            "failure": [op_to_json(op) for op in failure],
        }
        reply = await self._transport.call("/v3/kv/txn", body)
        responses = [op_result(r) for r in reply.get("responses", ())]
        return TxnResult(bool(reply.get("succeeded")), responses, _revision(reply))

    async def txn_each(
        self, items: Sequence[tuple[Sequence[Compare], Sequence[Op]]]
    ) -> tuple[list[bool], int]:
        """Run each item's ops if its own compares hold, all in one transaction (etcd's
        nested transactions, at most ``MAX_TXN_OPS``): which items held, and the
        revision after. Their keys must differ."""
        if len(items) > MAX_TXN_OPS:
            raise ValueError(f"at most {MAX_TXN_OPS} items in one transaction")
        nested = [
            {
                "request_txn": {
                    "compare": [c.to_json() for c in compare],
                    "success": [op_to_json(op) for op in ops],
                }
            }
            for compare, ops in items
        ]
        reply = await self._transport.call("/v3/kv/txn", {"success": nested})
        held = [
            bool(r.get("response_txn", {}).get("succeeded")) for r in reply.get("responses", ())
        ]
        if len(held) != len(items):
            raise EtcdError(f"etcd answered {len(held)} of {len(items)} nested transactions")
        return held, _revision(reply)

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Drop the history before ``revision``; watches from before it get ``Compacted``."""
        body = {"revision": str(revision), "physical": physical}
        await self._transport.call("/v3/kv/compaction", body)

    # Leases

    async def grant(self, ttl: int) -> Lease:
        """A new lease; etcd may raise ``ttl`` to its minimum (1.5 election timeouts)."""
        reply = await self._transport.call("/v3/lease/grant", {"TTL": str(ttl)})
        return Lease(num(reply, "ID"), num(reply, "TTL"))

    async def keepalive(self, lease_id: int) -> int:
        """Renew the lease; return its TTL. ``LeaseNotFound`` once it has expired."""
        return await self._keepalives.renew(lease_id)

    async def revoke(self, lease_id: int) -> None:
        """End the lease now, deleting the keys bound to it."""
        await self._transport.call("/v3/lease/revoke", {"ID": str(lease_id)})

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left. ``LeaseNotFound`` once it has expired."""
        reply = await self._transport.call("/v3/lease/timetolive", {"ID": str(lease_id)})
        # etcd says -1 for a lease it does not have; a live one's last second is 0, which
        # proto3 JSON leaves out.
        ttl = num(reply, "TTL")
        if ttl < 0:
            raise LeaseNotFound(f"lease {lease_id:x} has expired or does not exist", 5)
        return ttl

    # Watch

    async def watch(
        self,
        prefix: bytes,
        *,
        start_revision: int,
        prev_kv: bool = True,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[WatchEvent | WatchProgress, None]:
        """Changes under ``prefix`` from ``start_revision`` (0: from now), in order.

        Yields a ``WatchEvent`` per change and a ``WatchProgress`` for each of etcd's
        progress notifications (requested; etcd sends them per its
        ``--experimental-watch-progress-notify-interval``, 10 min by default).
        ``Compacted`` if the start is older than etcd's history; ``EtcdUnavailable``
        if the stream breaks, or is silent for ``idle_timeout`` seconds: resume from the
        last revision seen + 1. Stop iterating and close the iterator (``aclose``, or
        ``contextlib.aclosing``) to end the watch and free its connection at once.
        """
        body = {
            "create_request": {
                **key_range(prefix, True),
                "start_revision": str(start_revision),
                "prev_kv": prev_kv,
                "progress_notify": True,
            }
        }
        stream = await self._transport.stream("/v3/watch", body, idle_timeout)
        try:
            result = _watch_result(stream.first)
            while True:
                for item in result:
                    yield item
                result = _watch_result(await stream.next())
        finally:
            # Closing the response drops the connection; the gateway then cancels the
            # watch inside etcd.
            await stream.aclose()

    # Cluster

    async def member_list(self) -> list[Member]:
        reply = await self._transport.call("/v3/cluster/member/list", {})
        return [Member.from_json(m) for m in reply.get("members", ())]

    async def cluster_id(self) -> int:
        """etcd's id for its cluster: the same from every member, new with a new cluster."""
        reply = await self._transport.call("/v3/maintenance/status", {})
        return num(reply.get("header", {}), "cluster_id")

    async def status(self, endpoint: str) -> Status:
        """What the member at ``endpoint`` says of itself, asked of it alone."""
        reply = await self._transport.call("/v3/maintenance/status", {}, endpoint=endpoint)
        header = reply.get("header", {})
        return Status(
            member_id=num(header, "member_id"),
            leader=num(reply, "leader"),
            raft_term=num(reply, "raftTerm"),
            revision=num(header, "revision"),
        )


def _revision(reply: Json) -> int:
    return num(reply.get("header", {}), "revision")


def _watch_result(obj: Json) -> list[WatchEvent | WatchProgress]:
    """What one message of the watch stream holds for the consumer."""
    result = obj.get("result", {})
    if result.get("canceled"):
        if compacted := num(result, "compact_revision"):
            raise Compacted(compacted)
        raise EtcdError(f"etcd canceled the watch: {result.get('cancel_reason', 'no reason')}")
    if result.get("created"):
        return []
    events = result.get("events", ())
    if not events:
        return [WatchProgress(_revision(result))]
    return [WatchEvent.from_json(e) for e in events]
