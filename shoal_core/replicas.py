"""Several replicas of one registry, and the one rule for moving between them.

A sidecar or an operator command may be given a list of registry addresses
(``--registry a,b,c``), all replicas over one shared store: any of them answers any
call. ``parse_registries`` checks such a list; ``Replicas`` says which replica to use
now and, when one fails, which comes next (round robin). It is pure state, no I/O:
the sidecar's watch, policy watch and heartbeats share one, so that when the watch
finds a replica gone the next heartbeat already goes to the next one, and an outage
is said once, not once by each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal_core.addresses import AddressError, parse_address

__all__ = ["MAX_REPLICAS", "Move", "Replicas", "parse_registries"]

# More than any sensible control plane runs (Consul suggests 3 or 5 servers); a bound
# keeps a mistyped list from turning every failover into a long walk.
MAX_REPLICAS = 16


def parse_registries(text: str | Sequence[str]) -> tuple[str, ...]:
    """The addresses of a comma-separated ``host:port`` list (or of a sequence of them),
    in order, each checked, written twice kept once. ``AddressError`` in one line."""
    entries = text.split(",") if isinstance(text, str) else list(text)
    shown = text if isinstance(text, str) else ",".join(text)
    found: dict[object, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            raise AddressError(f"registry list {shown[:80]!r} has an empty entry")
        where = parse_address(entry)
        # One replica however it is written: "localhost" and "LOCALHOST" are one host.
        found.setdefault((where.host.lower(), where.port), entry)
    if not found:
        raise AddressError("no registry address given")
    if len(found) > MAX_REPLICAS:
        raise AddressError(
            f"registry list has {len(found)} addresses; at most {MAX_REPLICAS} replicas"
        )
    return tuple(found.values())


@dataclass(frozen=True, slots=True)
class Move:
    """A move from the replica at ``left`` to the one at ``to``. ``first``: the first
    since a replica last answered, the one worth a WARNING (the rest of an outage that
    takes every replica is said at DEBUG)."""

    left: str
    to: str
    first: bool


class Replicas:
    """The replica in use (``current``) among ``addresses``, moved on by ``failed``."""

    def __init__(self, addresses: str | Sequence[str]) -> None:
        self.addresses = parse_registries(addresses)
        self._index = 0
        self._said = False

    @classmethod
    def of(cls, registry: str | Sequence[str] | Replicas) -> Replicas:
        """``registry`` itself when it is already ``Replicas`` (shared), else new ones."""
        return registry if isinstance(registry, Replicas) else cls(registry)

    def __len__(self) -> int:
        return len(self.addresses)

    def __repr__(self) -> str:
        return f"Replicas({','.join(self.addresses)!r}, current={self.current!r})"

    @property
    def current(self) -> str:
        return self.addresses[self._index]

    def failed(self, address: str) -> Move | None:
        """The replica at ``address`` failed: if it is the one in use, the next one is
        now. None when nothing moved: a single replica, or another user of these
        replicas has moved on from ``address`` already."""
        if len(self.addresses) == 1 or address != self.current:
            return None
        self._index = (self._index + 1) % len(self.addresses)
        first, self._said = not self._said, True
        return Move(address, self.current, first)

    def answered(self, address: str) -> None:
        """The replica at ``address`` answered: the next outage is news again."""
        if address == self.current:
            self._said = False

    def in_turn(self) -> tuple[str, ...]:
        """Every address once, the one in use first: the order to try a call in."""
        i = self._index
        return self.addresses[i:] + self.addresses[:i]
