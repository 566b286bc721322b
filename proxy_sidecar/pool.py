"""Upstream channels: one per endpoint, opened ahead, watched, closed when not needed.

A channel is opened and asked to connect as soon as its endpoint appears, so the
first call does not pay for the handshake. A task per channel follows its
connectivity: an endpoint whose connection is failing is marked unreachable (the
cluster stops routing to it at once, before any call fails there) and an idle
connection is re-established. Channels close when their endpoint leaves or when
no call used them for ``idle_timeout`` seconds; a later call reopens them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from proxy_sidecar.endpoints import Endpoint, EndpointTable

__all__ = ["ChannelPool"]

logger = logging.getLogger(__name__)

# Methods cached per channel; a caller inventing method names gets uncached callables.
_MAX_CACHED_METHODS = 1024
# How long calls still running on a channel whose endpoint left may finish.
_LEAVE_GRACE = 30.0
_UNREACHABLE = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)

StreamCallable = grpc.aio.StreamStreamMultiCallable[bytes, bytes]
UnaryCallable = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


class _Entry:
    __slots__ = ("channel", "streams", "unaries", "used", "watcher")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.streams: dict[str, StreamCallable] = {}
        self.unaries: dict[str, UnaryCallable] = {}
        self.used = True
        self.watcher: asyncio.Task[None] | None = None


class ChannelPool:
    """Owns every upstream channel of a sidecar; ``close()`` closes them all."""

    def __init__(
        self,
        *tables: EndpointTable,
        idle_timeout: float,
        max_message_bytes: int,
    ) -> None:
        self._tables = tables
        self._idle_timeout = idle_timeout
        self._options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Each endpoint gets a connection of its own, not one shared across channels.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Reconnect soon after a failure: the endpoint may be back already.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        self._entries: dict[Endpoint, _Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        for table in tables:
            table.subscribe(self._on_change)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="pool-idle-sweeper")

    def _entry(self, endpoint: Endpoint) -> _Entry:
        entry = self._entries.get(endpoint)
        if entry is None:
            entry = self._open(endpoint)
        entry.used = True
        return entry

    def stream(self, endpoint: Endpoint, method: str) -> StreamCallable:
        """The raw-bytes stream-stream multicallable for ``method`` on ``endpoint``."""
        entry = self._entry(endpoint)
        found = entry.streams.get(method)
        if found is None:
            # A registered method skips interning the path in the core on every call;
            # the stubs do not declare the argument the generated code uses.
            channel: Any = entry.channel
            found = channel.stream_stream(method, _registered_method=True)
            if len(entry.streams) < _MAX_CACHED_METHODS:
                entry.streams[method] = found
        return found

    def unary(self, endpoint: Endpoint, method: str) -> UnaryCallable:
        """The raw-bytes unary-unary multicallable for ``method`` on ``endpoint``."""
        entry = self._entry(endpoint)
        found = entry.unaries.get(method)
        if found is None:
            channel: Any = entry.channel
            found = channel.unary_unary(method, _registered_method=True)
            if len(entry.unaries) < _MAX_CACHED_METHODS:
                entry.unaries[method] = found
        return found

    @property
    def open_channels(self) -> int:
        return len(self._entries)

    def _open(self, endpoint: Endpoint) -> _Entry:
        entry = _Entry(grpc.aio.insecure_channel(endpoint.address, options=self._options))
        self._entries[endpoint] = entry
        entry.watcher = asyncio.create_task(
            self._watch(endpoint, entry.channel), name=f"pool-watch-{endpoint.instance_id}"
        )
        return entry

    def _on_change(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if self._closed:
            return
        for endpoint in removed:
            entry = self._entries.pop(endpoint, None)
            if entry is not None:
                self._close_later(entry, _LEAVE_GRACE)
        for endpoint in added:
            if endpoint not in self._entries:
                self._open(endpoint)

    async def _watch(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        state = channel.get_state(try_to_connect=True)
        while True:
            endpoint.state = state.name
            reachable = state not in _UNREACHABLE
            if reachable != endpoint.reachable:
                endpoint.reachable = reachable
                for table in self._tables:
                    table.touch()
            if state is grpc.ChannelConnectivity.IDLE:
                # The server closed an idle connection or went away: reconnect now, so
                # a dead endpoint shows up as unreachable before a call is sent there.
                state = channel.get_state(try_to_connect=True)
                if state is not grpc.ChannelConnectivity.IDLE:
                    continue
            await channel.wait_for_state_change(state)
            state = channel.get_state()

    def _close_later(self, entry: _Entry, grace: float) -> None:
        task = asyncio.create_task(self._close_entry(entry, grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_entry(entry: _Entry, grace: float) -> None:
        if entry.watcher is not None:
            entry.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.watcher
        await entry.channel.close(grace)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self._idle_timeout / 2)
            for endpoint, entry in list(self._entries.items()):
                if entry.used:
                    entry.used = False
                    continue
                logger.debug("closing idle channel to %s", endpoint.address)
                del self._entries[endpoint]
                endpoint.state = "CLOSED_IDLE"
                self._close_later(entry, _LEAVE_GRACE)

    async def close(self, grace: float = 0.0) -> None:
        """Close every channel, letting running calls finish for ``grace`` seconds."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        entries = list(self._entries.values())
        self._entries.clear()
        pending = list(self._closing)
        await asyncio.gather(
            *(self._close_entry(e, grace) for e in entries),
            *(asyncio.wait_for(t, grace + 1.0) for t in pending),
            return_exceptions=True,
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
