"""The Registry gRPC service: wire messages in, domain calls, wire messages out.

Domain errors become status codes here and only here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from identity.authz import Policy
from identity.spiffe import SpiffeId
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.access import Access, PermissionDenied, Unauthenticated
from registry_service.backend import Backend
from registry_service.errors import (
    AlreadyExists,
    InvalidArgument,
    LeaseNotFound,
    LimitReached,
    RegistryError,
    StoreUnavailable,
)
from registry_service.model import Instance
from registry_service.policy_store import PolicyStore
from registry_service.validation import MAX_TTL_MS, check_lease_id, check_service_name
from registry_service.watch import WatchHub
from registry_service.wire import (
    InstanceRenderer,
    load_from_pb,
    merged,
    spec_from_pb,
    status_from_pb,
)
from shoal_core.codes import ErrorCodes
from shoal_core.config import ConfigError
from shoal_core.peers import peer_identity
from shoal_core.policy_wire import policy_from_pb, policy_to_pb
from shoal_core.servicing import maps_errors

__all__ = ["CODES", "RegistryServicer"]

logger = logging.getLogger(__name__)

CODES = ErrorCodes[grpc.StatusCode](
    {
        InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        LeaseNotFound: grpc.StatusCode.NOT_FOUND,
        LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
        StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
        Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    },
    default=grpc.StatusCode.FAILED_PRECONDITION,
)
_mapped = maps_errors(RegistryError, CODES)


class RegistryServicer(pb_grpc.RegistryServicer):
    """Maps Registry RPCs onto a ``Backend`` (reads from its view) and a ``WatchHub``,
    and the policy RPCs onto a ``PolicyStore``."""

    def __init__(
        self,
        backend: Backend,
        *,
        progress_interval: float,
        queue_size: int,
        queue_bytes: int,
        access: Access | None = None,
        policies: PolicyStore | None = None,
    ) -> None:
        self._backend = backend
        self._store = store = backend.view
        self._policies = policies or PolicyStore()
        # The wire form of the current policy, made once for all its watchers.
        self._rendered: tuple[int, pb.Policy] | None = None
        self._access = access or Access(None)
        self._render = InstanceRenderer(store.get)
        store.subscribe(self._render.on_event)
        self._hub: WatchHub[pb.WatchEvent] = WatchHub(
            store,
            lambda e: self._render.event(e, store.epoch),
            pb.WatchEvent.ByteSize,
            limit=queue_size,
            limit_bytes=queue_bytes,
        )
        self._progress_interval = progress_interval

    @property
    def hub(self) -> WatchHub[pb.WatchEvent]:
        return self._hub

    @property
    def policies(self) -> PolicyStore:
        return self._policies

    @_mapped
    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterResponse:
        if not request.HasField("instance"):
            raise InvalidArgument("instance", "is required")
        spec = spec_from_pb(request.instance)
        who = self._who(context)
        self._access.write(who, "register", spec.service)
        held = self._store.get(spec.instance_id)
        if held is not None and held.spec.service != spec.service:
            # Re-registering another service's instance id would take it out of the mesh.
            self._access.write(who, "replace", held.spec.service)
        replaced = None if held is None else held.spec.service  # (by an operator)
        for grpc_service in spec.grpc_services:
            owners = self._store.grpc_owners(grpc_service) - {replaced}
            self._access.claim(who, spec.service, grpc_service, owners)
        owners = self._store.address_owners(spec.address) - {replaced}
        self._access.place(who, spec.service, spec.address, owners)
        status = status_from_pb("instance.status", request.instance.status)
        if request.ttl_ms > MAX_TTL_MS:
            raise InvalidArgument("ttl_ms", f"{request.ttl_ms} is out of range 0..{MAX_TTL_MS}")
        inst = await self._backend.register(spec, request.ttl_ms / 1000, status)
        ttl_ms = round(inst.ttl * 1000)
        return pb.RegisterResponse(
            lease_id=inst.lease_id,
            ttl_ms=ttl_ms,
            revision=inst.revision,
            heartbeat_interval_ms=max(1, ttl_ms // 3),
        )

    @_mapped
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        lease_id = check_lease_id(request.lease_id)
        self._check_lease(context, "renew", lease_id)
        status = status_from_pb("status", request.status)
        load = load_from_pb("load", request.load)
        inst = await self._backend.heartbeat(lease_id, status, load)
        return pb.HeartbeatResponse(ttl_ms=round(inst.ttl * 1000), revision=self._store.revision)

    @_mapped
    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeregisterResponse:
        lease_id = check_lease_id(request.lease_id)
        self._check_lease(context, "deregister", lease_id)
        await self._backend.deregister(lease_id)
        return pb.DeregisterResponse(revision=self._store.revision)

    @_mapped
    async def Discover(
        self, request: pb.DiscoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DiscoverResponse:
        self._access.read(self._who(context))
        if request.service:
            check_service_name("service", request.service)
        found = self._store.discover(
            request.service, request.grpc_service, request.include_unhealthy
        )
        reply = pb.DiscoverResponse(
            revision=self._store.revision, self_preservation=self._store.preservation.active
        )
        self._fill(reply.instances, found)
        return reply

    @_mapped
    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        self._access.read(self._who(context))
        service = request.service
        if service:
            check_service_name("service", service)
        store = self._store
        # Subscribing and reading the snapshot happen with no await between them, so no
        # event can fall in the gap; any duplicate is dropped by the revision check below.
        sub = self._hub.open(service)
        try:
            replay = (
                store.events_since(request.since_revision, service)
                if request.since_revision
                else None
            )
            # `sent` is the revision the watcher is complete up to. It is read before each
            # yield: changes made while a yield waits are queued with higher revisions and
            # must not be dropped as duplicates.
            sent = store.revision
            if replay is not None:
                for group in replay.groups():
                    for msg in merged([self._render.event(e, store.epoch) for e in group]):
                        yield msg
            if replay is None or replay.lost:
                sent = store.revision
                yield self._snapshot(service)
            while not sub.closed:
                if not await sub.wait(self._progress_interval):
                    # Nothing was queued, so nothing at or below this revision is pending.
                    yield pb.WatchEvent(
                        type=pb.WatchEvent.PROGRESS,
                        revision=store.revision,
                        registry_epoch=store.epoch,
                    )
                    continue
                if sub.overflowed:
                    sub.overflowed = False
                    sub.clear()
                    logger.warning(
                        "watcher of %r fell behind; sending a fresh snapshot", service or "*"
                    )
                    sent = store.revision
                    yield self._snapshot(service)
                    continue
                # A revision at a time, so what is not sent yet stays counted against
                # the queue.
                while (queued := sub.pop()) is not None:
                    revision, msgs = queued
                    if revision > sent:
                        sent = revision
                        for msg in merged(msgs):
                            yield msg
        finally:
            self._hub.release(sub)

    @_mapped
    async def ListServices(
        self, request: pb.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListServicesResponse:
        self._access.read(self._who(context))
        store = self._store
        everyone = store.instances()
        reply = pb.ListServicesResponse(
            revision=store.revision,
            state=pb.RegistryState(
                self_preservation=store.preservation.active,
                self_preservation_reason=store.preservation.reason,
                self_preservation_seconds=store.preservation.seconds_active(store.now()),
                instances_total=len(everyone),
                instances_healthy=sum(1 for inst in everyone if inst.healthy),
                watchers=self._hub.watchers,
                registry_epoch=store.epoch,
            ),
        )
        for summary in store.services():
            reply.services.add(
                name=summary.name,
                instances=summary.instances,
                healthy=summary.healthy,
                grpc_services=summary.grpc_services,
            )
        return reply

    @_mapped
    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetPolicyResponse:
        self._access.operate(self._who(context), "set the mesh's authorization policy")
        if not request.HasField("policy"):
            raise InvalidArgument("policy", "is required")
        try:
            policy = policy_from_pb(request.policy)
        except ConfigError as exc:
            raise InvalidArgument("policy", "; ".join(exc.problems)) from exc
        try:
            version = self._policies.set(policy)
        except OSError as exc:
            raise RegistryError(f"the policy could not be kept ({exc}); it is unchanged") from None
        logger.info(
            "authorization policy %d set: %d rules, default %s",
            version,
            len(policy.rules),
            policy.default,
        )
        return pb.SetPolicyResponse(version=version)

    @_mapped
    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Policy:
        self._access.read(self._who(context))
        return self._policy_pb(self._policies.version, self._policies.policy)

    @_mapped
    async def WatchPolicy(
        self, request: pb.WatchPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Policy]:
        self._access.read(self._who(context))
        watcher = self._policies.watch(request.known_version)
        try:
            while (update := await watcher.next()) is not None:
                yield self._policy_pb(*update)
        finally:
            self._policies.release(watcher)

    def _policy_pb(self, version: int, policy: Policy) -> pb.Policy:
        rendered = self._rendered
        if rendered is None or rendered[0] != version:
            rendered = self._rendered = (version, policy_to_pb(policy, version))
        return rendered[1]

    def _who(self, context: grpc.aio.ServicerContext[Any, Any]) -> SpiffeId | None:
        # Without TLS there is no identity to read (and no rule needs one).
        return None if self._access.trust_domain is None else peer_identity(context)

    def _check_lease(
        self, context: grpc.aio.ServicerContext[Any, Any], action: str, lease_id: str
    ) -> None:
        # An unknown lease is NOT_FOUND for everyone (the store says so next); a known one
        # may be touched only by its own service.
        service = self._store.service_of_lease(lease_id)
        who = self._who(context)
        if service is None:
            self._access.read(who)
        else:
            self._access.write(who, action, service)

    def _fill(self, out: Any, instances: list[Instance]) -> None:
        for inst in instances:
            self._render.add_to(out, inst, self._store.lease_age(inst.spec.instance_id))

    def _snapshot(self, service: str) -> pb.WatchEvent:
        store = self._store
        msg = pb.WatchEvent(
            type=pb.WatchEvent.SNAPSHOT, revision=store.revision, registry_epoch=store.epoch
        )
        self._fill(msg.instances, store.instances(service))
        return msg
