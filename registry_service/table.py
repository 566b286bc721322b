"""Instances by id, indexed by service, gRPC service and address: the read side of a view.

``InstanceTable`` holds the current ``Instance`` of each id and answers every read the
servicer makes of it. ``check_room`` says whether one more registration fits the
config's bounds, in the same words whichever backend asks. Both backends hold their
instances in one: the memory store, and the etcd mirror of every replica.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable, Sequence

from registry_service.config import RegistryConfig
from registry_service.errors import LimitReached
from registry_service.model import Instance, InstanceSpec, ServiceSummary

__all__ = ["InstanceTable", "check_room"]


class InstanceTable:
    """The current instance of each id, and the indexes reads go through."""

    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}
        self._by_service: dict[str, set[str]] = collections.defaultdict(set)
        self._by_grpc: dict[str, set[str]] = collections.defaultdict(set)
        self._by_address: dict[str, set[str]] = collections.defaultdict(set)
        # The retained_bytes() of every spec held, bounded by max_instances_bytes.
        self.instances_bytes = 0

    def __len__(self) -> int:
        return len(self._instances)

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def members(self, service: str) -> Collection[str]:
        return self._by_service.get(service, ())

    def instances(self, service: str = "") -> list[Instance]:
        if not service:
            return list(self._instances.values())
        return [self._instances[i] for i in self._by_service.get(service, ())]

    def discover(self, service: str, grpc_service: str, include_unhealthy: bool) -> list[Instance]:
        """Instances of ``service`` and/or serving ``grpc_service``; healthy ones unless asked."""
        if grpc_service:
            ids: Iterable[str] = self._by_grpc.get(grpc_service, ())
            found = [self._instances[i] for i in ids]
            if service:
                found = [inst for inst in found if inst.spec.service == service]
        else:
            found = self.instances(service)
        if not include_unhealthy:
            found = [inst for inst in found if inst.healthy]
        return found

    def grpc_owners(self, grpc_service: str) -> set[str]:
        """The services whose instances say they serve ``grpc_service``."""
        return {self._instances[i].spec.service for i in self._by_grpc.get(grpc_service, ())}

    def address_owners(self, address: str) -> set[str]:
        """The services with an instance registered at ``address``."""
        return {self._instances[i].spec.service for i in self._by_address.get(address, ())}

    def services(self) -> list[ServiceSummary]:
        out = []
        for name in sorted(self._by_service):
            members = [self._instances[i] for i in self._by_service[name]]
            grpc_names = sorted({g for inst in members for g in inst.spec.grpc_services})
            healthy = sum(1 for inst in members if inst.healthy)
            out.append(ServiceSummary(name, len(members), healthy, tuple(grpc_names)))
        return out

    def put(self, inst: Instance) -> Instance | None:
        """Hold ``inst`` as the current instance of its id; return the one it replaces."""
        spec = inst.spec
        old = self._instances.get(spec.instance_id)
        if old is not None and old.spec is not spec:
            self._unindex(old.spec)
        if old is None or old.spec is not spec:
            self._index(spec)
        self._instances[spec.instance_id] = inst
        return old

    def pop(self, instance_id: str) -> Instance | None:
        inst = self._instances.pop(instance_id, None)
        if inst is not None:
            self._unindex(inst.spec)
        return inst

    def _index(self, spec: InstanceSpec) -> None:
        self.instances_bytes += spec.retained_bytes()
        self._by_service[spec.service].add(spec.instance_id)
        for name in spec.grpc_services:
            self._by_grpc[name].add(spec.instance_id)
        self._by_address[spec.address].add(spec.instance_id)

    def _unindex(self, spec: InstanceSpec) -> None:
        self.instances_bytes -= spec.retained_bytes()
        for index, key in (
            (self._by_service, spec.service),
            (self._by_address, spec.address),
            *((self._by_grpc, name) for name in spec.grpc_services),
        ):
            ids = index[key]
            ids.discard(spec.instance_id)
            if not ids:
                del index[key]


def check_room(
    config: RegistryConfig,
    table: InstanceTable,
    spec: InstanceSpec,
    pending: Sequence[InstanceSpec] = (),
) -> None:
    """Raise ``LimitReached`` unless registering ``spec`` fits, with the registrations
    still on their way to the table (``pending``) counted as if they were in it."""
    old = table.get(spec.instance_id)
    coming = [p for p in pending if table.get(p.instance_id) is None]
    held = len(table) + len(coming)
    if old is None and held >= config.max_instances:
        raise LimitReached(
            f"the registry holds {held} instances, its limit; "
            "the operator can raise it with shoal registry --max-instances"
        )
    members = table.members(spec.service)
    count = len(members) + sum(1 for p in coming if p.service == spec.service)
    if spec.instance_id not in members and count >= config.max_instances_per_service:
        raise LimitReached(
            f"service {spec.service!r} has {count} instances, the limit per "
            "service; the operator can raise it with shoal registry "
            "--max-instances-per-service"
        )
    size = spec.retained_bytes()
    freed = 0 if old is None else old.spec.retained_bytes()
    total = table.instances_bytes + sum(p.retained_bytes() for p in coming)
    if total - freed + size > config.max_instances_bytes:
        raise LimitReached(
            f"instance data would pass the registry's limit of {config.max_instances_bytes} "
            f"bytes (this instance holds {size}); send less metadata, or the operator "
            "can raise it with shoal registry --max-instances-bytes"
        )
