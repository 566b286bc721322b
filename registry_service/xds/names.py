"""Host names of registered addresses, resolved for EDS (no gRPC).

gRPC's xDS client takes an endpoint's address as an IP literal and NACKs a whole
ClusterLoadAssignment holding a name, yet instances often register by name
(``worker1:7900`` in a compose network, a pod's DNS name). So the registry resolves
them, as Istio's control plane resolves a DNS ServiceEntry: ``address_of`` answers from
a cache at once, and a name it has not seen yet is resolved in the background, its
instances left out of EDS until it is (listing them by name would cost the service's
every endpoint). Every ``refresh`` seconds each name some instance still registers by
(``in_use``) is resolved again, so a name that moves, or one that did not resolve at
first, is followed, and the others are forgotten; ``on_change`` is told whenever what
a name resolves to changes. The registry resolves from where it runs: clients in
another network view must be able to reach the addresses it finds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from shoal_core.lifecycle import stop_task

__all__ = ["HostNames", "Resolve", "system_resolve"]

logger = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[str | None]]
# Resolutions in flight at once: each holds one of the default executor's threads.
_AT_ONCE = 8
_TIMEOUT = 5.0


async def system_resolve(host: str) -> str | None:
    """The first address the system's resolver gives ``host`` (IPv4 first), or None."""
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), _TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError):
        return None
    addresses = [str(info[4][0]) for info in found]
    return next((a for a in addresses if ":" not in a), addresses[0] if addresses else None)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostNames:
    """Host name -> IP address, at most ``max_names`` of them, kept current."""

    def __init__(
        self,
        on_change: Callable[[], None],
        in_use: Callable[[], Iterable[str]],
        *,
        resolve: Resolve = system_resolve,
        refresh: float = 10.0,
        max_names: int = 4096,
    ) -> None:
        self._on_change = on_change
        self._in_use = in_use
        self._resolve = resolve
        self._refresh = refresh
        self._max = max_names
        self._known: dict[str, str | None] = {}  # None: did not resolve (yet)
        self._waiting: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._full_said = False

    def address_of(self, host: str) -> str | None:
        """``host`` as an IP literal, or None while it is not (yet) resolved."""
        if is_ip(host):
            return host
        if host in self._known:
            return self._known[host]
        if len(self._known) + len(self._waiting) >= self._max:
            if not self._full_said:
                self._full_said = True
                logger.warning("xDS: more than %d host names to resolve; %s waits", self._max, host)
            return None
        self._waiting.add(host)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xds-host-names")
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time() + self._refresh
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_round - loop.time()))
            except TimeoutError:
                pass
            self._wake.clear()
            names = sorted(self._waiting)
            self._waiting.clear()
            if loop.time() >= next_round:
                next_round = loop.time() + self._refresh
                # A round: forget the names no instance has any more, redo the rest.
                used = {host for host in self._in_use() if not is_ip(host)}
                for gone in self._known.keys() - used:
                    del self._known[gone]
                names = sorted(set(names) | (used & self._known.keys()))
            await self._resolve_all(names)

    async def _resolve_all(self, names: list[str]) -> None:
        changed = False
        for start in range(0, len(names), _AT_ONCE):
            batch = names[start : start + _AT_ONCE]
            found = await asyncio.gather(*(self._resolve(name) for name in batch))
            for name, address in zip(batch, found, strict=True):
                before = self._known.get(name, None)
                if address is None and name not in self._known:
                    logger.warning("xDS: %s does not resolve; its instances wait", name)
                self._known[name] = address
                changed |= address != before
        if changed:
            self._on_change()

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
