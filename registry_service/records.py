"""How the registry lies in etcd: its keys, and the JSON of each value.

Under the backend's prefix::

    instances/<id>   the instance's record: spec, status, load, TTL, etcd lease, and
                     (once the leader marked it lapsed) when that was, wall-clock
    alive/<id>       empty, bound to the instance's etcd lease: etcd deletes it when
                     the lease ends, which is how a lapse is seen
    leader           the name of the replica that sweeps, bound to that replica's lease
    preservation     the self-preservation state, written by the leader

Only a record's changes are registry events; the other keys are state beside them.
Lease ids go to callers as etcd's own, in hex (as ``etcdctl`` prints them), so any
replica can renew any lease.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from registry_service.model import Instance, InstanceSpec, LoadReport, ServingStatus

__all__ = [
    "Keys",
    "PreservationView",
    "PreservationState",
    "Record",
    "decode_preservation",
    "decode_record",
    "encode_preservation",
    "encode_record",
    "lease_text",
    "parse_lease",
    "read_record",
]


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one registry under ``prefix``."""

    prefix: bytes

    def record(self, instance_id: str) -> bytes:
        return self.prefix + b"instances/" + instance_id.encode()

    def alive(self, instance_id: str) -> bytes:
        return self.prefix + b"alive/" + instance_id.encode()

    @property
    def leader(self) -> bytes:
        return self.prefix + b"leader"

    @property
    def preservation(self) -> bytes:
        return self.prefix + b"preservation"

    def parse(self, key: bytes) -> tuple[str, str]:
        """``(kind, instance id)`` of a key under the prefix: kind is "instances",
        "alive", "leader" or "preservation" (id ""), or "" for a key of none of these."""
        rest = key[len(self.prefix) :].decode(errors="replace")
        kind, _, instance_id = rest.partition("/")
        if instance_id and kind in ("instances", "alive"):
            return kind, instance_id
        return (rest, "") if rest in ("leader", "preservation") else ("", "")


def lease_text(lease: int) -> str:
    return f"{lease:x}"


def parse_lease(text: str) -> int | None:
    """The etcd lease of a caller's lease id; None when it cannot be one."""
    try:
        lease = int(text, 16)
    except ValueError:
        return None
    return lease if 0 < lease < 1 << 63 else None


@dataclass(frozen=True, slots=True)
class Record:
    """An instance as its record holds it (revision 0: the mirror sets it)."""

    instance: Instance
    lease: int
    # Wall-clock time (time.time()) the leader marked the lease lapsed; None while live.
    lapsed_at: float | None = None


def encode_record(inst: Instance, lease: int, lapsed_at: float | None = None) -> bytes:
    spec, load = inst.spec, inst.load
    body: dict[str, Any] = {
        "id": spec.instance_id,
        "service": spec.service,
        "address": spec.address,
        "grpc": list(spec.grpc_services),
        "metadata": dict(spec.metadata),
        "weight": spec.weight,
        "zone": spec.zone,
        "status": int(inst.status),
        "load": [load.in_flight, load.queue_depth, load.cpu_percent, load.memory_bytes],
        "ttl": inst.ttl,
        "lease": lease_text(lease),
    }
    if lapsed_at is not None:
        body["lapsed_at"] = lapsed_at
    return json.dumps(body, separators=(",", ":")).encode()


def decode_record(value: bytes) -> Record:
    """The record in ``value``; ``ValueError`` if it is not one."""
    try:
        body = json.loads(value)
        spec = InstanceSpec(
            instance_id=str(body["id"]),
            service=str(body["service"]),
            address=str(body["address"]),
            grpc_services=tuple(str(g) for g in body["grpc"]),
            metadata=MappingProxyType({str(k): str(v) for k, v in body["metadata"].items()}),
            weight=int(body["weight"]),
            zone=str(body["zone"]),
        )
        in_flight, queue_depth, cpu, memory = body["load"]
        load = LoadReport(int(in_flight), int(queue_depth), float(cpu), int(memory))
        lease = parse_lease(str(body["lease"]))
        lapsed = body.get("lapsed_at")
        if lease is None:
            raise ValueError(f"bad lease {body['lease']!r}")
        inst = Instance(
            spec,
            lease_text(lease),
            float(body["ttl"]),
            ServingStatus(int(body["status"])),
            load,
            lease_ok=lapsed is None,
        )
        return Record(inst, lease, None if lapsed is None else float(lapsed))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not an instance record: {exc}") from exc


def read_record(value: bytes) -> Record | None:
    """The record in ``value``, or None when it holds none."""
    try:
        return decode_record(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class PreservationState:
    """Self-preservation as the leader decided it; what every replica shows."""

    active: bool = False
    reason: str = ""
    # Wall-clock time it was entered (time.time()); meaningful while active.
    since: float = 0.0
    entered_total: int = 0

    def seconds_active(self, wall: float | None = None) -> float:
        if not self.active:
            return 0.0
        return max(0.0, (time.time() if wall is None else wall) - self.since)


def encode_preservation(state: PreservationState) -> bytes:
    body = {
        "active": state.active,
        "reason": state.reason,
        "since": state.since,
        "entered_total": state.entered_total,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def decode_preservation(value: bytes) -> PreservationState:
    try:
        body = json.loads(value)
        return PreservationState(
            active=bool(body["active"]),
            reason=str(body["reason"]),
            since=float(body["since"]),
            entered_total=int(body["entered_total"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a preservation state: {exc}") from exc


class PreservationView:
    """Self-preservation as the leader last wrote it, timed on this replica's clock."""

    def __init__(self, state: PreservationState, since: float) -> None:
        self.state = state
        self._since = since

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def reason(self) -> str:
        return self.state.reason

    @property
    def entered_total(self) -> int:
        return self.state.entered_total

    def seconds_active(self, now: float) -> float:
        return now - self._since if self.state.active else 0.0
