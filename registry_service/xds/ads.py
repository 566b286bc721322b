"""The Aggregated Discovery Service on the registry's own port: gRPC clients with
``xds:///SERVICE`` targets read the mesh from it with no sidecar.

State of the world only (gRPC's clients speak it; the delta variant answers
UNIMPLEMENTED). Each stream has a reader task that feeds its requests to its
``StreamState`` and a writer, the handler itself, that sends what is due whenever the
reader or a registry change wakes it. Registry changes are gathered for
``COALESCE`` seconds and then handed to every stream at once, so a burst of
heartbeats or a rolling restart costs one round of comparisons, not one per event;
streams whose resources did not change send nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from registry_service.access import Access
from registry_service.backend import RegistryView
from registry_service.errors import LimitReached, RegistryError
from registry_service.model import Event
from registry_service.servicer import CODES
from registry_service.xds.catalog import Catalog, registered_hosts
from registry_service.xds.names import HostNames
from registry_service.xds.policy import XdsPolicies
from registry_service.xds.streams import StreamState
from shoal_core.lifecycle import stop_task
from shoal_core.peers import peer_identity
from shoal_core.servicing import maps_errors

__all__ = ["COALESCE", "SERVICE_NAME", "AdsServicer", "add_to_server"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# Long enough to gather a burst of changes, short enough to stay far inside the 1 s a
# change may take to reach subscribed clients.
COALESCE = 0.05

_mapped = maps_errors(RegistryError, CODES)


class _Stream:
    """A stream's state and the event that wakes its writer."""

    def __init__(self, max_names: int) -> None:
        self.state = StreamState(max_names)
        self.wake = asyncio.Event()
        self.closed = False
        # What ended the stream from the reader's side (a request over the name limit).
        self.error: Exception | None = None


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves ``view`` as xDS to at most ``max_streams`` streams at once, each with at
    most ``max_names`` resource names; reads are allowed as ``access`` says; ``policies``
    shape the routes and clusters (``policy``). A registry on mTLS (``access`` has a
    trust domain) tells clients to call on mTLS too (``tls``)."""

    def __init__(
        self,
        view: RegistryView,
        *,
        access: Access,
        max_streams: int,
        max_names: int,
        policies: XdsPolicies | None = None,
    ) -> None:
        # Registered host names, resolved: gRPC takes only IP literals in EDS.
        self.names = HostNames(self._names_changed, lambda: registered_hosts(view))
        self._catalog = Catalog(view, policies, access.trust_domain, self.names)
        self._access = access
        self._max_streams = max_streams
        self._max_names = max_names
        self._streams: set[_Stream] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._closed = False
        view.subscribe(self._on_event)

    @property
    def streams(self) -> int:
        return len(self._streams)

    def close_all(self) -> None:
        """End every stream: on shutdown, so a graceful stop need not wait them out."""
        self._closed = True
        for stream in self._streams:
            stream.closed = True
            stream.wake.set()

    @_mapped
    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        if self._access.trust_domain is not None:
            self._access.read(peer_identity(context))  # xDS is a read of the registry
        if self._closed:
            return  # shutting down: the client reconnects, to this registry or another
        if len(self._streams) >= self._max_streams:
            raise LimitReached(
                f"the registry serves at most {self._max_streams} xDS streams at once "
                "(xds_max_streams)"
            )
        stream = _Stream(self._max_names)
        self._streams.add(stream)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while not stream.closed:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.error is not None:
                    raise stream.error
                if reader.done():
                    break
                for response in stream.state.responses(self._catalog):
                    yield response
        finally:
            self._streams.discard(stream)
            await stop_task(reader)

    async def _read(
        self, stream: _Stream, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> None:
        try:
            async for request in requests:
                if stream.state.on_request(request):
                    stream.wake.set()
        except (grpc.RpcError, grpc.aio.AbortError):
            pass  # the call ended under us (the client went, or its request was undecodable)
        except Exception as exc:  # the writer raises it, so the call ends with its status
            stream.error = exc
        finally:
            stream.wake.set()  # the client half-closed or failed: the writer ends too

    def _on_event(self, event: Event) -> None:
        self._catalog.changed(event)
        self._soon()

    def _names_changed(self) -> None:
        self._catalog.names_changed()
        self._soon()

    def _soon(self) -> None:
        if self._flush is None and self._streams:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(COALESCE, self._wake_all)

    def _wake_all(self) -> None:
        self._flush = None
        for stream in self._streams:
            stream.wake.set()


def add_to_server(servicer: AdsServicer, server: grpc.aio.Server) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
