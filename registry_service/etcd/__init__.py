"""An async etcd v3 client, for the registry's state in etcd (issue 12).

Why etcd's HTTP/JSON gateway through httpx, and not a Python etcd package: the
best-known gRPC clients (``etcd3``, python-etcd3, last released in 2020, and its
forks) are unmaintained, and their generated ``_pb2`` modules fail on current
protobuf; the maintained gRPC ones (``aetcd``) ship generated code of their own,
which would tie our protobuf and grpcio floors to theirs; the maintained gateway
client (``etcd3gw``) is synchronous (requests), and would block the registry's event
loop. The gateway is part of etcd itself: every member serves it on its client URL
(``POST /v3/kv/range`` ...), with the v3 API's semantics, as stable as that API.
httpx, already one of our dependencies, gives it an async client with pooled
keep-alive connections, per-request timeouts, streamed replies (for watches) and TLS.
The cost is JSON instead of protobuf and a connection per watch rather than
multiplexed streams, both small next to what the registry sends. Nothing here imports
grpc, and there is no generated code to keep.

Errors:

EtcdError             etcd refused a request (``code``: its gRPC status code)
+-- LeaseNotFound     the lease has expired, was revoked, or never existed
+-- Compacted         a watch started before the history etcd still has: list again
+-- EtcdUnavailable   no endpoint answered (connection error, timeout or 5xx from each),
                      or a watch stream broke
"""

from __future__ import annotations

from registry_service.etcd.client import EtcdClient
from registry_service.etcd.model import (
    Compare,
    Delete,
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
)
from registry_service.etcd.tls import EtcdTls
from registry_service.etcd.transport import Compacted, EtcdError, EtcdUnavailable, LeaseNotFound

__all__ = [
    "Compacted",
    "Compare",
    "Delete",
    "EtcdClient",
    "EtcdError",
    "EtcdTls",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "Member",
    "Op",
    "Put",
    "Range",
    "Status",
    "TxnResult",
    "WatchEvent",
    "WatchProgress",
]
