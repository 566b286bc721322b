"""The dashboard's picture of the mesh at one moment, as JSON-ready data: what the page shows.

- an instance: its registry state and its own sidecar's inbound calls;
- a service: the inbound calls of all its instances, added up;
- an edge caller -> service, seen two ways: ``inbound``, at the callee's sidecars, by the
  caller each one named (from the caller's certificate; ``unknown`` without mTLS); and
  ``outbound``, at the scraped callers' sidecars, by the called service (so the client
  sidecar's page shows calls that reached no instance at all);
- denied calls by (source, destination): grown in the window, and in all.

Pure, like the figures it adds up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal_cli.dashboard.figures import UNKNOWN, Bucket, Calls, Denied, Growth, Tally
from shoal_cli.dashboard.model import Member, MeshView, Target, health, status

__all__ = ["MAX_ROWS", "snapshot"]

# Instance rows in one snapshot: the page of a huge mesh stays a page.
MAX_ROWS = 500
NO_IDENTITY = "(no mesh identity)"
NOT_SCRAPED = "not scraped (no admin address, or past the target limit)"


def _calls(growth: Growth, direction: str) -> Iterable[tuple[Calls | Bucket, float]]:
    for key, grew in growth.grown.items():
        if isinstance(key, Calls | Bucket) and key.direction == direction:
            yield key, grew


def _tally(growths: Iterable[Growth]) -> Tally:
    tally = Tally()
    for growth in growths:
        for key, grew in _calls(growth, "inbound"):
            tally.add(key, grew, growth.seconds)
    return tally


def _routable(member: Member) -> bool:
    """What the registry's Discover would hand out: a live lease, and SERVING."""
    return member.instance.healthy and status(member.instance) == "SERVING"


def _instance_row(member: Member, now: float, target: Target | None, growth: Growth) -> Any:
    inst = member.instance
    scrape = target.error if target is not None else NOT_SCRAPED
    return {
        "id": inst.instance_id,
        "address": inst.address,
        "health": health(inst),
        "status": status(inst),
        "zone": inst.zone,
        "weight": inst.weight or 100,
        "lease_age": round(member.lease_age(now), 1),
        "load": {
            "in_flight": inst.load.in_flight,
            "queue_depth": inst.load.queue_depth,
            "cpu_percent": round(inst.load.cpu_percent, 1),
        },
        "figures": _tally([growth]).figures().as_json(),
        "scrape": scrape,
    }


def _edges(view: MeshView, growths: dict[str, tuple[Target, Growth]]) -> list[dict[str, Any]]:
    mesh_service: dict[str, str] = {}  # gRPC service -> the mesh service serving it
    for member in view.members.values():
        for name in member.instance.grpc_services:
            mesh_service.setdefault(name, member.instance.service)
    edges: dict[tuple[str, str, str], Tally] = {}
    for target, growth in growths.values():
        found = view.members.get(target.instance_id or "")
        own = found.instance.service if found is not None else UNKNOWN
        for direction in ("inbound", "outbound"):
            for key, grew in _calls(growth, direction):
                if direction == "inbound":
                    pair = (key.caller, own)
                else:
                    caller = key.caller if key.caller != UNKNOWN else own
                    pair = (caller, mesh_service.get(key.service, key.service))
                tally = edges.setdefault((*pair, direction), Tally())
                tally.add(key, grew, growth.seconds)
    return [
        {"caller": caller, "service": service, "seen": seen, "figures": t.figures().as_json()}
        for (caller, service, seen), t in sorted(edges.items())
    ]


def _denied(growths: dict[str, tuple[Target, Growth]]) -> dict[str, Any]:
    pairs: dict[tuple[str, str], list[float]] = {}
    for target, growth in growths.values():
        for key, value in target.history.latest.items():
            if isinstance(key, Denied):
                pairs.setdefault((key.source, key.destination), [0.0, 0.0])[0] += value
        for key, grew in growth.grown.items():
            if isinstance(key, Denied):
                pairs.setdefault((key.source, key.destination), [0.0, 0.0])[1] += grew
    rows = [
        {
            "source": source or NO_IDENTITY,
            "destination": dest,
            "total": round(t),
            "recent": round(r),
        }
        for (source, dest), (t, r) in sorted(pairs.items())
    ]
    return {
        "total": sum(r["total"] for r in rows),
        "recent": sum(r["recent"] for r in rows),
        "pairs": rows,
    }


def snapshot(view: MeshView) -> dict[str, Any]:
    """Everything the page shows, as of now."""
    now = view.clock()
    growths = {
        address: (t, t.history.growth(now) if t.error is None else Growth())
        for address, t in view.scrape_targets.items()
    }
    by_instance = {t.instance_id: (t, g) for t, g in growths.values() if t.instance_id}
    grouped: dict[str, list[Member]] = {}
    for instance_id in sorted(view.members):
        member = view.members[instance_id]
        grouped.setdefault(member.instance.service, []).append(member)
    services, shown = [], 0
    for name, members in sorted(grouped.items()):
        rows = []
        for member in members:
            if shown >= MAX_ROWS:
                break
            target, growth = by_instance.get(member.instance.instance_id, (None, Growth()))
            rows.append(_instance_row(member, now, target, growth))
            shown += 1
        ids = (m.instance.instance_id for m in members)
        tally = _tally(by_instance[i][1] for i in ids if i in by_instance)
        services.append(
            {
                "name": name,
                "instances": len(members),
                "serving": sum(1 for m in members if _routable(m)),
                "figures": tally.figures().as_json(),
                "rows": rows,
            }
        )
    return {
        "registry": {
            "address": view.registry,
            "connected": view.connected,
            "error": view.registry_error,
            "revision": view.revision,
        },
        "window_seconds": view.window,
        "services": services,
        "instances_total": len(view.members),
        "instances_shown": shown,
        "edges": _edges(view, growths),
        "denied": _denied(growths),
        "events": list(reversed(view.events)),
        "load_updates": view.load_updates,
        "targets": [
            {"address": t.address, "instance": t.instance_id, "error": t.error}
            for t in view.scrape_targets.values()
        ],
    }
