"""Conversions between wire messages and domain values (protobuf, no gRPC).

Rendering an instance is cached by its revision: Discover and Watch then copy
ready messages instead of rebuilding them on every call. Only the current state
of a registered instance is cached, so the cache holds at most one message per
instance: replays of the past and removals are rendered but not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from protos import registry_pb2 as pb
from registry_service.model import (
    Event,
    EventKind,
    Instance,
    InstanceSpec,
    LoadReport,
    ServingStatus,
)
from registry_service.validation import check_load, check_status, make_spec

__all__ = ["InstanceRenderer", "load_from_pb", "spec_from_pb", "status_from_pb"]


def spec_from_pb(msg: pb.Instance) -> InstanceSpec:
    return make_spec(
        instance_id=msg.instance_id,
        service=msg.service,
        address=msg.address,
        grpc_services=msg.grpc_services,
        metadata=msg.metadata,
        weight=msg.weight,
        zone=msg.zone,
    )


def status_from_pb(field: str, value: int) -> ServingStatus:
    return check_status(field, value)


def load_from_pb(field: str, msg: pb.LoadReport) -> LoadReport:
    return check_load(field, msg.in_flight, msg.queue_depth, msg.cpu_percent, msg.memory_bytes)


def _render(inst: Instance) -> pb.Instance:
    spec = inst.spec
    load = inst.load
    return pb.Instance(
        instance_id=spec.instance_id,
        service=spec.service,
        address=spec.address,
        grpc_services=spec.grpc_services,
        metadata=dict(spec.metadata),
        weight=spec.weight,
        zone=spec.zone,
        status=pb.ServingStatus.ValueType(inst.status.value),
        load=pb.LoadReport(
            in_flight=load.in_flight,
            queue_depth=load.queue_depth,
            cpu_percent=load.cpu_percent,
            memory_bytes=load.memory_bytes,
        ),
        healthy=inst.lease_ok,
        ttl_ms=round(inst.ttl * 1000),
    )


class InstanceRenderer:
    """Renders instances to messages, once per instance revision.

    ``current`` looks up the registered instance of an id (the store's ``get``).
    """

    def __init__(self, current: Callable[[str], Instance | None]) -> None:
        self._current = current
        self._cache: dict[str, tuple[int, pb.Instance]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def _message(self, inst: Instance) -> pb.Instance:
        entry = self._cache.get(inst.spec.instance_id)
        # An instance's revision changes whenever any rendered field does.
        if entry is not None and entry[0] == inst.revision:
            return entry[1]
        msg = _render(inst)
        if self._current(inst.spec.instance_id) is inst:
            self._cache[inst.spec.instance_id] = (inst.revision, msg)
        return msg

    def add_to(
        self, out: RepeatedCompositeFieldContainer[pb.Instance], inst: Instance, lease_age: float
    ) -> None:
        item = out.add()
        item.CopyFrom(self._message(inst))
        item.lease_age_seconds = lease_age

    def event(self, event: Event, epoch: str) -> pb.WatchEvent:
        removed = event.kind is EventKind.REMOVE
        msg = pb.WatchEvent(
            type=pb.WatchEvent.REMOVE if removed else pb.WatchEvent.UPSERT,
            revision=event.revision,
            registry_epoch=epoch,
        )
        msg.instances.add().CopyFrom(self._message(event.instance))
        return msg

    def on_event(self, event: Event) -> None:
        """Store listener: drop the cached message of an instance that left."""
        if event.kind is EventKind.REMOVE:
            self._cache.pop(event.instance.spec.instance_id, None)


def merged(messages: Sequence[pb.WatchEvent]) -> list[pb.WatchEvent]:
    """One revision's events as few messages as its kinds allow: consecutive ones of one
    type become one message listing every instance, so that a watcher has a revision
    whole or not at all (resuming after it must not skip the rest of it). Writers put
    only one kind of change in one transaction, so a revision is one message."""
    if len(messages) == 1:
        return list(messages)
    out: list[pb.WatchEvent] = []
    for msg in messages:
        if out and out[-1].type == msg.type:
            out[-1].instances.extend(msg.instances)
        else:
            # A new message: rendered ones are shared by every watcher, never changed.
            out.append(
                pb.WatchEvent(
                    type=msg.type,
                    revision=msg.revision,
                    registry_epoch=msg.registry_epoch,
                    instances=msg.instances,
                )
            )
    return out
