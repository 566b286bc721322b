"""The sidecar's own gRPC calls (to the registry, to its app), on the data plane.

The data plane (``DataPlane.call``) sends one request message and reports each
response message, then the status, from its own thread; here they are handed to the
event loop and turned into awaitables: ``unary`` for one reply, ``stream`` for a
server-streaming call such as the registry's Watch. Messages are protobuf messages
on this side; codes are gRPC's numbers (no grpcio in the sidecar's process).
``Follower`` keeps such a stream open for good: the registry's Watch and WatchPolicy,
moving to the next registry replica when the one it follows fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from shoal_dataplane import DataPlane

from shoal_core.backoff import Attempts
from shoal_core.codes import INTERNAL, UNAVAILABLE, code_name
from shoal_core.replicas import Replicas

__all__ = ["Follower", "Rpc", "RpcError"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class RpcError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: int, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code_name(code)}: {details}")

    @property
    def name(self) -> str:
        return code_name(self.code)


_END = object()


class Rpc:
    """Calls on ``dataplane``, awaited on the running event loop."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self._loop = asyncio.get_running_loop()
        # The queues of calls under way: a data plane that stops ends its calls without
        # a word, so ``close`` ends them here.
        self._open: set[asyncio.Queue[object]] = set()

    def close(self) -> None:
        """The data plane has stopped: every call still waiting ends UNAVAILABLE."""
        for queue in self._open:
            queue.put_nowait((UNAVAILABLE, "shoal: the sidecar's data plane stopped"))
            queue.put_nowait(_END)

    async def unary(
        self, address: str, path: str, request: Message, reply: type[M], *, timeout: float
    ) -> M:
        """One call with one reply; ``RpcError`` unless it ends OK."""
        async with contextlib.aclosing(
            self.stream(address, path, request, reply, timeout=timeout)
        ) as replies:
            answer: M | None = None
            async for message in replies:
                if answer is not None:
                    raise RpcError(INTERNAL, f"{path} answered more than once")
                answer = message
        if answer is None:
            raise RpcError(INTERNAL, f"{path} ended OK without an answer")
        return answer

    async def stream(
        self,
        address: str,
        path: str,
        request: Message,
        reply: type[M],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[M]:
        """The replies of one call as they come; ``RpcError`` unless it ends OK. Closing
        the iterator early cancels the call."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        post = self._loop.call_soon_threadsafe

        def on_message(data: bytes) -> None:
            post(queue.put_nowait, data)

        def done(code: int, details: str) -> None:
            post(queue.put_nowait, (code, details))
            post(queue.put_nowait, _END)

        call = self._dataplane.call(
            address, path, request.SerializeToString(), timeout, on_message, done
        )
        self._open.add(queue)
        ended = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, tuple):
                    code, details = item
                    if code != 0:
                        ended = True
                        raise RpcError(code, details)
                    continue
                assert isinstance(item, bytes)
                try:
                    message = reply.FromString(item)
                except DecodeError:
                    raise RpcError(
                        INTERNAL, f"{path} answered a message that does not decode"
                    ) from None
                yield message
        finally:
            self._open.discard(queue)
            if not ended:
                call.cancel()


class Follower(Generic[M]):
    """Follows the server stream ``path`` at the current one of ``replicas`` for good:
    each message goes to ``on_message``; after a break it moves to the next replica,
    says once what is kept (``kept()``) and opens the stream again after the one
    backoff, with a request made afresh (``request()``), so that it resumes where it
    stopped: replicas over one store replay what was missed. Says ``what`` it follows
    in its logs. Owns its task, from ``start`` to ``close``."""

    def __init__(
        self, replicas: Replicas, path: str, reply: type[M], attempts: Attempts, what: str
    ) -> None:
        self._replicas = replicas
        self._path = path
        self._reply = reply
        self._attempts = attempts
        self._what = what
        self.connected = False
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    def start(
        self,
        rpc: Rpc,
        request: Callable[[], Message],
        on_message: Callable[[M], None],
        kept: Callable[[], str],
    ) -> None:
        self._task = asyncio.create_task(
            self._run(rpc, request, on_message, kept), name=f"follow {self._what}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(
        self,
        rpc: Rpc,
        request: Callable[[], Message],
        on_message: Callable[[M], None],
        kept: Callable[[], str],
    ) -> None:
        attempts, replicas = self._attempts, self._replicas
        while True:
            address = replicas.current
            try:
                async for message in rpc.stream(address, self._path, request(), self._reply):
                    if not self.connected:
                        self.connected = True
                        if attempts.failures:
                            logger.info("following the %s at %s again", self._what, address)
                        attempts.succeeded()
                        replicas.answered(address)
                    on_message(message)
                reason = "the server ended the stream"
            except RpcError as exc:
                reason = str(exc)
            move = replicas.failed(address)
            where = "" if move is None else f"; moving to the replica at {move.to}"
            # Once per outage (and once per move across replicas), not once per retry.
            if self.connected or attempts.failures == 0 or (move is not None and move.first):
                logger.warning(
                    "the %s at %s broke off (%s); %s%s",
                    self._what,
                    address,
                    reason,
                    kept(),
                    where,
                )
            else:
                logger.debug("the %s at %s: %s%s", self._what, address, reason, where)
            self.connected = False
            self.reconnects += 1
            await asyncio.sleep(attempts.failed())
