"""What the dashboard knows of a mesh: instances, recent registry events, scrape targets.

Fed by the registry's Watch (``apply``) and by scrapes of each sidecar's ``/metrics``
(``scraped``); read as one JSON-ready snapshot (``shoal_cli.dashboard.summary``). No
I/O here and no grpc: the registry's messages are plain protobuf.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from protos import registry_pb2 as pb
from shoal_cli.dashboard.figures import WINDOW, History, Reading
from shoal_core.addresses import AddressError, parse_address

__all__ = ["MAX_EVENTS", "MAX_TARGETS", "Member", "MeshView", "Target", "health", "status"]

MAX_EVENTS = 100
# Scraped each second: a bound on the dashboard's own work and connections.
MAX_TARGETS = 128


@dataclass
class Member:
    """One registered instance as last heard of, ``heard_at`` on the monotonic clock."""

    instance: pb.Instance
    heard_at: float

    def lease_age(self, now: float) -> float:
        return self.instance.lease_age_seconds + max(0.0, now - self.heard_at)


@dataclass
class Target:
    """A sidecar admin page to scrape: a registered instance's, or one named by flag."""

    address: str
    instance_id: str | None = None
    history: History = field(default_factory=History)
    error: str | None = None


def status(inst: pb.Instance) -> str:
    """SERVING, NOT_SERVING, DRAINING (UNSPECIFIED: not said yet)."""
    return pb.ServingStatus.Name(inst.status).removeprefix("SERVING_STATUS_")


def health(inst: pb.Instance) -> str:
    """The lease's state: healthy, or lapsed (the first stage of expiry)."""
    return "healthy" if inst.healthy else "lapsed"


def _changes(old: pb.Instance, new: pb.Instance) -> list[str]:
    """What an operator would call a change; load and lease age are not (they move all
    the time and show in the instance's row)."""
    said = []
    for name, read in (("health", health), ("status", status)):
        if read(old) != read(new):
            said.append(f"{name} {read(old)} -> {read(new)}")
    for attr in ("address", "zone", "weight"):
        if getattr(old, attr) != getattr(new, attr):
            said.append(f"{attr} {getattr(old, attr)!s} -> {getattr(new, attr)!s}")
    return said


class MeshView:
    """The instances the registry reported, its recent events, and the scrape targets."""

    def __init__(
        self,
        registry: str,
        extra_targets: Sequence[str] = (),
        *,
        admin_key: str,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        # The instance metadata key naming its sidecar's admin address (the sidecar's own
        # constant, given by the caller: importing the sidecar here would bring grpc).
        self._admin_key = admin_key
        self.window = window
        self.clock = clock
        self._wall = wall
        self.members: dict[str, Member] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.revision = 0
        self.connected = False
        self.registry_error: str | None = None
        self.load_updates = 0
        self._extra = list(dict.fromkeys(extra_targets))
        self._targets: dict[str, Target] = {}

    # -- the registry -----------------------------------------------------------------

    def apply(self, event: pb.WatchEvent) -> None:
        """One Watch message: a snapshot replaces what was known, deltas change it."""
        now = self.clock()
        self.connected, self.registry_error = True, None
        self.revision = max(self.revision, event.revision)
        if event.type == pb.WatchEvent.SNAPSHOT:
            self.members = {i.instance_id: Member(i, now) for i in event.instances}
            self._note(event.revision, "snapshot", "", "", f"{len(event.instances)} instances")
        elif event.type == pb.WatchEvent.UPSERT:
            for inst in event.instances:
                self._upsert(event.revision, inst, now)
        elif event.type == pb.WatchEvent.REMOVE:
            for inst in event.instances:
                self.members.pop(inst.instance_id, None)
                self._note(event.revision, "left", inst.service, inst.instance_id, "removed")

    def _upsert(self, revision: int, inst: pb.Instance, now: float) -> None:
        old = self.members.get(inst.instance_id)
        self.members[inst.instance_id] = Member(inst, now)
        if old is None:
            detail = f"{inst.address} {health(inst)}/{status(inst)}"
            self._note(revision, "joined", inst.service, inst.instance_id, detail)
            return
        changes = _changes(old.instance, inst)
        if changes:
            self._note(revision, "changed", inst.service, inst.instance_id, "; ".join(changes))
        else:
            self.load_updates += 1

    def refresh_leases(self, instances: Iterable[pb.Instance]) -> None:
        """Fresh lease ages (a Discover): Watch says nothing while nothing changes."""
        now = self.clock()
        for inst in instances:
            member = self.members.get(inst.instance_id)
            if member is not None:
                member.instance.lease_age_seconds = inst.lease_age_seconds
                member.heard_at = now

    def registry_down(self, why: str) -> None:
        self.connected, self.registry_error = False, why

    def _note(self, revision: int, kind: str, service: str, instance: str, detail: str) -> None:
        self.events.append(
            {
                "at": round(self._wall(), 3),
                "revision": revision,
                "kind": kind,
                "service": service,
                "instance": instance,
                "detail": detail,
            }
        )

    # -- scrape targets ---------------------------------------------------------------

    def targets(self) -> list[Target]:
        """What to scrape now: every instance's sidecar admin page, then the extra ones,
        at most ``MAX_TARGETS``; targets gone from the list lose their history."""
        wanted: dict[str, str | None] = {}
        for instance_id in sorted(self.members):
            admin = self.members[instance_id].instance.metadata.get(self._admin_key, "")
            if admin and _is_address(admin):
                wanted.setdefault(admin, instance_id)
        for address in self._extra:
            wanted.setdefault(address, None)
        chosen = dict(list(wanted.items())[:MAX_TARGETS])
        kept: dict[str, Target] = {}
        for address, owner in chosen.items():
            known = self._targets.get(address)
            if known is None or known.instance_id != owner:
                known = Target(address, owner, History(self.window))
            kept[address] = known
        self._targets = kept
        return list(kept.values())

    @property
    def scrape_targets(self) -> dict[str, Target]:
        return self._targets

    @property
    def extra_targets(self) -> list[str]:
        return list(self._extra)

    def scraped(self, target: Target, at: float, reading: Reading) -> None:
        target.error = None
        target.history.add(at, reading)

    def scrape_failed(self, target: Target, why: str) -> None:
        target.error = why


def _is_address(text: str) -> bool:
    try:
        parse_address(text)
    except AddressError:
        return False
    return True
