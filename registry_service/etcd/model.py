"""What the etcd client sends and returns, and how each maps onto the gateway's JSON.

The gateway speaks proto3 JSON: bytes fields are base64, 64-bit integers are strings,
and fields at their zero value are left out (a PUT event has no ``type``, a lease that
has expired answers a keepalive with no ``TTL``), so every read has a default.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

__all__ = [
    "Compare",
    "Delete",
    "KeyValue",
    "Lease",
    "Member",
    "Op",
    "Put",
    "Range",
    "Status",
    "TxnResult",
    "WatchEvent",
    "WatchProgress",
]

Json = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def num(obj: Json, field: str) -> int:
    """An integer field; the gateway leaves out zeros and sends 64-bit ones as strings."""
    return int(obj.get(field, 0))


def key_range(key: bytes, prefix: bool) -> Json:
    """``key`` alone, or every key that starts with it (etcd's [key, range_end) form)."""
    if not prefix:
        return {"key": b64(key)}
    # The prefix's successor: drop trailing 0xff bytes and bump the last one. With no
    # successor (empty, or all 0xff), etcd's range_end "\0" means "every key from here".
    stem = key.rstrip(b"\xff")
    end = stem[:-1] + bytes([stem[-1] + 1]) if stem else b"\x00"
    return {"key": b64(key or b"\x00"), "range_end": b64(end)}


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it; ``lease`` is 0 when no lease is bound to it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, obj: Json) -> KeyValue:
        return cls(
            key=unb64(obj.get("key", "")),
            value=unb64(obj.get("value", "")),
            create_revision=num(obj, "create_revision"),
            mod_revision=num(obj, "mod_revision"),
            version=num(obj, "version"),
            lease=num(obj, "lease"),
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under the watched prefix. For a DELETE, ``kv`` holds only the key and
    the revision of the delete (``prev_kv`` has what was there, when asked for)."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @classmethod
    def from_json(cls, obj: Json) -> WatchEvent:
        prev = obj.get("prev_kv")
        return cls(
            type="DELETE" if obj.get("type") == "DELETE" else "PUT",
            kv=KeyValue.from_json(obj.get("kv", {})),
            prev_kv=KeyValue.from_json(prev) if prev is not None else None,
        )


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """etcd's progress notification: every change up to ``revision`` has been sent."""

    revision: int


@dataclass(frozen=True, slots=True)
class Member:
    """A member of the cluster: etcd's id for it, its name and its URLs."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]

    @classmethod
    def from_json(cls, obj: Json) -> Member:
        return cls(
            id=num(obj, "ID"),
            name=obj.get("name", ""),
            peer_urls=tuple(obj.get("peerURLs", ())),
            client_urls=tuple(obj.get("clientURLs", ())),
        )


@dataclass(frozen=True, slots=True)
class Status:
    """One member's view: its id, the leader it follows (0: none), its term and revision."""

    member_id: int
    leader: int
    raft_term: int
    revision: int


class Lease(NamedTuple):
    """A granted lease: its id and the TTL etcd gave it, in seconds."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: ``target`` of ``key`` compared with ``value``.

    ``Compare.absent``, ``Compare.mod_revision`` and ``Compare.value_is`` build the
    three that compare-and-swap needs.
    """

    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    value: int | bytes
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"] = "EQUAL"

    def __post_init__(self) -> None:
        if (self.target == "VALUE") != isinstance(self.value, bytes):
            wanted = "bytes" if self.target == "VALUE" else "an int"
            raise TypeError(f"a {self.target} compare takes {wanted}")

    @classmethod
    def absent(cls, key: bytes) -> Compare:
        return cls(key, "CREATE", 0)

    @classmethod
    def mod_revision(cls, key: bytes, revision: int) -> Compare:
        return cls(key, "MOD", revision)

    @classmethod
    def value_is(cls, key: bytes, value: bytes) -> Compare:
        return cls(key, "VALUE", value)

    def to_json(self) -> Json:
        field = _COMPARE_FIELDS[self.target]
        value = b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": b64(self.key), "target": self.target, "result": self.result, field: value}


_COMPARE_FIELDS = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}


@dataclass(frozen=True, slots=True)
class Put:
    """Set ``key`` to ``value``, bound to ``lease`` unless it is 0."""

    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> Json:
        return {"key": b64(self.key), "value": b64(self.value), "lease": str(self.lease)}


@dataclass(frozen=True, slots=True)
class _Keys:
    key: bytes
    prefix: bool = False

    def to_json(self) -> Json:
        return key_range(self.key, self.prefix)


class Delete(_Keys):
    """Delete ``key``, or every key under it with ``prefix``."""

    __slots__ = ()


class Range(_Keys):
    """Read ``key``, or every key under it with ``prefix``."""

    __slots__ = ()


Op = Put | Delete | Range
# A transaction's reply to each op: nothing for a put, the count for a delete, the keys
# for a range.
OpResult = int | list[KeyValue] | None
_REQUEST_FIELDS = {Put: "request_put", Delete: "request_delete_range", Range: "request_range"}


def op_to_json(op: Op) -> Json:
    return {_REQUEST_FIELDS[type(op)]: op.to_json()}


def op_result(obj: Json) -> OpResult:
    if "response_range" in obj:
        return [KeyValue.from_json(kv) for kv in obj["response_range"].get("kvs", ())]
    if "response_delete_range" in obj:
        return num(obj["response_delete_range"], "deleted")
    return None


class TxnResult(NamedTuple):
    """Whether the compares held, what each op of the branch taken returned, and the
    revision after the transaction."""

    succeeded: bool
    responses: list[OpResult]
    revision: int
