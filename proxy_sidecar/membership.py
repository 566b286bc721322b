"""Bringing the co-located app into the mesh: register, health-check, heartbeat, deregister.

The app needs no Shoal code. Its gRPC services come from the settings or, when
none are given, from the app's server reflection. Each heartbeat carries the
app's grpc.health.v1 status and the load the sidecar sees going into it. When
the registry has forgotten the lease (``NOT_FOUND``: it expired or the registry
restarted) the sidecar registers again after a random pause, so a restarted
registry is not hit by every instance at once. Draining deregisters first.

With several registry replicas, a call that cannot reach the one in use
(UNAVAILABLE, DEADLINE_EXCEEDED: connection refused or reset, no answer) is made at
once on the next, each tried once, so a heartbeat lands within its interval and the
lease does not lapse; over a shared store the lease simply goes on there. NOT_FOUND
is an answer, not a failure: register again (on that replica).

Heartbeats that keep failing are said once at WARNING, and their recovery once
at INFO: an operator sees an outage and its end, not a line per heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from protos import registry_pb2 as pb
from proxy_sidecar.config import MembershipSettings
from proxy_sidecar.reflect import list_services
from proxy_sidecar.rpc import Rpc, RpcError
from shoal_core.backoff import Attempts, Backoff
from shoal_core.codes import DEADLINE_EXCEEDED, NOT_FOUND, UNAVAILABLE, UNIMPLEMENTED
from shoal_core.replicas import Replicas

__all__ = ["Membership"]

logger = logging.getLogger(__name__)

_RPC_TIMEOUT = 3.0
_REGISTRY = "/shoal.registry.v1.Registry/"
_CHECK = "/grpc.health.v1.Health/Check"
# Heartbeats failing for this many intervals are an outage worth a WARNING.
_WARN_AFTER_INTERVALS = 3
# Codes that say the replica was not reached (or did not answer): the next may be.
_UNREACHED = (UNAVAILABLE, DEADLINE_EXCEEDED)

M = TypeVar("M", bound=Message)


class Membership:
    """Keeps one registration of the app alive at ``registry`` (one address, several,
    or replicas shared with other users); owns its heartbeat task."""

    def __init__(
        self,
        rpc: Rpc,
        registry: str | Sequence[str] | Replicas,
        *,
        service: str,
        app: str,
        advertise: str,
        settings: MembershipSettings,
        load: Callable[[], int],
        forwarding: Callable[[], bool] = lambda: True,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._service = service
        self._advertise = advertise
        self._load = load
        self._forwarding = forwarding
        self._rng = rng or random.Random()
        host_port = advertise.replace("[", "").replace("]", "")
        self.instance_id = settings.instance_id or f"{service}@{host_port}"
        self._rpc = rpc
        self._replicas = Replicas.of(registry)
        self._app = app
        self._task: asyncio.Task[None] | None = None
        self.grpc_services: tuple[str, ...] = settings.grpc_services
        self._metadata: dict[str, str] = dict(settings.metadata)
        self.lease_id = ""
        self.status: pb.ServingStatus.ValueType = pb.NOT_SERVING
        self.registrations = 0
        self.heartbeats = 0
        # False once the app's health check found nothing listening (or no answer in time).
        self.app_reachable = True
        self._check_timeout = _RPC_TIMEOUT
        self._failing_since: float | None = None
        self._warned = False

    async def start(self) -> None:
        """Find what the app serves, register it, then keep it registered in the background.

        A registry that cannot be reached now does not stop start-up: the background
        task keeps trying.
        """
        if not self.grpc_services:
            self.grpc_services = await list_services(self._rpc, self._app)
        interval: float | None = None
        try:
            interval = await self._register()
        except RpcError as exc:
            logger.warning("cannot register %s yet: %s", self.instance_id, exc.details)
        self._task = asyncio.create_task(self._run(interval), name="membership")

    async def check_app(self) -> pb.ServingStatus.ValueType:
        """The app's grpc.health.v1 status as a registry status.

        NOT_SERVING, whatever the app says, while this sidecar cannot forward to it.
        """
        if not self._forwarding():
            return pb.NOT_SERVING
        try:
            reply = await self._rpc.unary(
                self._app,
                _CHECK,
                health_pb2.HealthCheckRequest(service=self._settings.health_service),
                health_pb2.HealthCheckResponse,
                timeout=self._check_timeout,
            )
        except RpcError as exc:
            self.app_reachable = exc.code not in (UNAVAILABLE, DEADLINE_EXCEEDED)
            # An app without the health service is judged by being reachable.
            if exc.code == UNIMPLEMENTED:
                return pb.SERVING
            return pb.NOT_SERVING
        self.app_reachable = True
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return pb.SERVING
        return pb.NOT_SERVING

    def _load_report(self) -> pb.LoadReport:
        return pb.LoadReport(in_flight=self._load())

    async def _register(self) -> float:
        self.status = await self.check_app()
        instance = pb.Instance(
            instance_id=self.instance_id,
            service=self._service,
            address=self._advertise,
            grpc_services=self.grpc_services,
            metadata=self._metadata,
            weight=self._settings.weight,
            zone=self._settings.zone,
            status=self.status,
            load=self._load_report(),
        )
        reply = await self._call(
            "Register",
            pb.RegisterRequest(instance=instance, ttl_ms=round(self._settings.ttl * 1000)),
            pb.RegisterResponse,
            _RPC_TIMEOUT,
        )
        self.lease_id = reply.lease_id
        self.registrations += 1
        self._registry_answered()
        logger.info(
            "registered %s (%s) at %s, lease %d ms, with the registry at %s",
            self.instance_id,
            ", ".join(self.grpc_services),
            self._advertise,
            reply.ttl_ms,
            self._replicas.current,
        )
        interval: float = reply.heartbeat_interval_ms / 1000
        # A check that outlives half an interval would delay the heartbeat it feeds.
        self._check_timeout = min(_RPC_TIMEOUT, interval / 2)
        return interval

    async def _call(self, method: str, request: Message, reply: type[M], timeout: float) -> M:
        """``method`` at the registry replica in use; one that is not reached hands the
        call at once to the next, each tried once. The last failure is raised."""
        replicas = self._replicas
        failure: RpcError | None = None
        for _ in range(len(replicas)):
            address = replicas.current
            try:
                answer = await self._rpc.unary(
                    address, _REGISTRY + method, request, reply, timeout=timeout
                )
            except RpcError as exc:
                if exc.code not in _UNREACHED:
                    raise
                failure, move = exc, replicas.failed(address)
                if move is not None:
                    say = logger.warning if move.first else logger.debug
                    say("registry %s not reached (%s); moving to %s", address, exc, move.to)
                continue
            replicas.answered(address)
            return answer
        assert failure is not None
        raise failure

    def _heartbeat_timeout(self, interval: float) -> float:
        # With replicas, each gets at most half an interval, so that one that does not
        # answer leaves the next the time to take the heartbeat before the next is due.
        return _RPC_TIMEOUT if len(self._replicas) == 1 else min(_RPC_TIMEOUT, interval / 2)

    def _registry_answered(self) -> None:
        if self._warned and self._failing_since is not None:
            logger.info(
                "heartbeats to the registry recovered after %.1fs",
                time.monotonic() - self._failing_since,
            )
        self._failing_since = None
        self._warned = False

    def _heartbeat_failed(self, exc: RpcError, interval: float) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing_for = now - self._failing_since
        if not self._warned and failing_for >= _WARN_AFTER_INTERVALS * interval:
            self._warned = True
            logger.warning(
                "heartbeats to the registry at %s have failed for %.1fs (%s: %s); "
                "still routing, and the lease of %s lapses if this goes on",
                ", ".join(self._replicas.addresses),
                failing_for,
                exc.name,
                exc.details,
                self.instance_id,
            )
        else:
            logger.debug("heartbeat failed: %s", exc.name)

    async def _run(self, interval: float | None) -> None:
        # Registering again is paced like every retry, and never waits past a heartbeat.
        ceiling = self._settings.ttl / 3
        attempts = Attempts(Backoff(initial=min(0.2, ceiling), maximum=ceiling), self._rng)
        while True:
            if interval is not None:
                await self._heartbeat_until_lost(interval)
                # The lease is gone: come back after a random share of the interval.
                await asyncio.sleep(self._rng.uniform(0.0, interval))
            try:
                interval = await self._register()
            except RpcError as exc:
                if attempts.failures == 0:
                    logger.warning("cannot register %s: %s", self.instance_id, exc.details)
                await asyncio.sleep(attempts.failed())
                interval = None
                continue
            attempts.succeeded()

    async def _heartbeat_until_lost(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.status = await self.check_app()
            try:
                await self._call(
                    "Heartbeat",
                    pb.HeartbeatRequest(
                        lease_id=self.lease_id, status=self.status, load=self._load_report()
                    ),
                    pb.HeartbeatResponse,
                    self._heartbeat_timeout(interval),
                )
                self.heartbeats += 1
                self._registry_answered()
            except RpcError as exc:
                if exc.code == NOT_FOUND:
                    self._registry_answered()
                    logger.info("lease of %s is gone; registering again", self.instance_id)
                    return
                # No replica reached: keep trying; the lease may still be alive.
                self._heartbeat_failed(exc, interval)

    async def drain(self) -> None:
        """Stop heartbeating and deregister, so callers stop picking this instance."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease_id:
            try:
                await self._call(
                    "Deregister",
                    pb.DeregisterRequest(lease_id=self.lease_id),
                    pb.DeregisterResponse,
                    _RPC_TIMEOUT,
                )
                logger.info("deregistered %s", self.instance_id)
            except RpcError as exc:
                logger.warning("deregister of %s failed: %s", self.instance_id, exc.details)
            self.lease_id = ""

    async def close(self) -> None:
        await self.drain()
