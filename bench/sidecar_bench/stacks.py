"""The targets of a run: the worker direct, and the worker behind each proxy, once or twice.

One hop: the worker registered by itself (no sidecar of its own), so the sidecar's path
is one proxy like nginx's and HAProxy's. Two hops, as the mesh runs: a client sidecar,
then the worker's own sidecar (``--service/--app``, which registers the worker at its
inbound address), then the worker; against two nginx and two HAProxy in a row, and two
of the sidecar's data plane with a control plane that decides nothing (``floor``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from .measure import Meter
from .procs import Child, floor, haproxy, nginx, registered, shoal, wait_serving
from .wire import SERVICE, echo_message

__all__ = ["FLOOR", "Target", "idle_rss", "one_hop", "ready", "two_hop"]

PROBE = echo_message(64)
FLOOR = "data plane x2"


@dataclass
class Target:
    """Where the load goes, and the proxy processes it costs (none for the worker direct)."""

    name: str
    address: str
    meter: Meter | None


async def ready(targets: dict[str, tuple[Child, ...]]) -> dict[str, Target]:
    """Each target, once an Echo comes back whole through it; measured from then on.

    The meters are made after the first calls: nginx's worker exists by then, and is
    measured with its master. A target's first process is where its load goes.
    """
    found: dict[str, Target] = {}
    for name, children in targets.items():
        address = children[0].address
        try:
            await wait_serving(address, PROBE)
        except RuntimeError:
            why = "".join(f"; {c.log.stem}{c.why()}" for c in children)
            raise RuntimeError(f"{name} at {address} does not answer Echo{why}") from None
        meter = None if name == "direct" else Meter([c.pid for c in children])
        found[name] = Target(name, address, meter)
    return found


async def one_hop(stack: contextlib.AsyncExitStack, tmp: Path, worker: Child) -> dict[str, Target]:
    """direct, sidecar, nginx, haproxy: each proxy one hop in front of ``worker``."""
    upstream = worker.address
    registry = await stack.enter_async_context(
        shoal(tmp / "registry.log", "registry", "--listen", "127.0.0.1:0")
    )
    await stack.enter_async_context(registered(registry.address, upstream))
    sidecar = await stack.enter_async_context(
        shoal(tmp / "sidecar.log", "sidecar", "--listen", "127.0.0.1:0",
              "--registry", registry.address, "--grace", "1")
    )  # fmt: skip
    ngx = await stack.enter_async_context(nginx(tmp / "nginx", upstream))
    hap = await stack.enter_async_context(haproxy(tmp / "haproxy", upstream))
    return await ready(
        {"direct": (worker,), "sidecar": (sidecar,), "nginx": (ngx,), "haproxy": (hap,)}
    )


async def two_hop(
    stack: contextlib.AsyncExitStack, tmp: Path, worker: Child
) -> tuple[dict[str, Target], dict[str, Meter]]:
    """direct and two of each proxy in a row; also each sidecar's meter on its own."""
    upstream = worker.address
    registry = await stack.enter_async_context(
        shoal(tmp / "registry-2.log", "registry", "--listen", "127.0.0.1:0")
    )
    worker_side = await stack.enter_async_context(
        shoal(tmp / "worker-sidecar.log", "sidecar", "--listen", "127.0.0.1:0",
              "--inbound", "127.0.0.1:0", "--registry", registry.address, "--service", "bench",
              "--app", upstream, "--grpc-service", SERVICE, "--grace", "1")
    )  # fmt: skip
    client_side = await stack.enter_async_context(
        shoal(tmp / "client-sidecar.log", "sidecar", "--listen", "127.0.0.1:0",
              "--registry", registry.address, "--grace", "1")
    )  # fmt: skip
    floor_b = await stack.enter_async_context(floor(tmp / "floor-b.log", upstream))
    floor_a = await stack.enter_async_context(floor(tmp / "floor-a.log", floor_b.address))
    ngx_b = await stack.enter_async_context(nginx(tmp / "nginx-b", upstream))
    ngx_a = await stack.enter_async_context(nginx(tmp / "nginx-a", ngx_b.address))
    hap_b = await stack.enter_async_context(haproxy(tmp / "haproxy-b", upstream))
    hap_a = await stack.enter_async_context(haproxy(tmp / "haproxy-a", hap_b.address))
    targets = await ready({
        "direct": (worker,),
        "sidecar x2": (client_side, worker_side),
        FLOOR: (floor_a, floor_b),
        "nginx x2": (ngx_a, ngx_b),
        "haproxy x2": (hap_a, hap_b),
    })  # fmt: skip
    sidecars = {
        "client sidecar": Meter([client_side.pid]),
        "worker sidecar": Meter([worker_side.pid]),
    }
    return targets, sidecars


async def idle_rss(meters: dict[str, Meter]) -> dict[str, int]:
    """Resident bytes after a moment's rest (start-up and the first calls settle)."""
    await asyncio.sleep(1.0)
    return {name: meter.rss() for name, meter in meters.items()}
