"""``shoal stats``: what every worker and sidecar of a running mesh reports about itself.

Workers and sidecars are found through the registry: each sidecar registers its
app with the app's own address (``shoal.app``) and its admin address
(``shoal.admin``) in the instance metadata. More can be named with flags, such
as the client sidecar's admin address, which is not registered.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
import grpc

from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from proxy_sidecar.server import ADMIN_KEY, APP_KEY
from shoal_cli.errors import UserError
from shoal_cli.operator import ask_registry
from shoal_cli.options import ADDRESS
from shoal_cli.output import emit_json
from shoal_cli.registry_ops import registry_option, unreachable
from shoal_cli.render import emit_table, message_json

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub
    from protos.worker_pb2_grpc import WorkerAsyncStub

__all__ = ["stats"]


async def find_targets(registries: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(worker name -> app address, sidecar name -> admin address) from the registry
    (the first of its replicas reached)."""

    async def ask(channel: grpc.aio.Channel) -> rpb.DiscoverResponse:
        stub: RegistryAsyncStub = rpb_grpc.RegistryStub(channel)
        return await stub.Discover(rpb.DiscoverRequest(include_unhealthy=True), timeout=5)

    try:
        found = await ask_registry(registries, ask)
    except grpc.aio.AioRpcError as exc:
        raise unreachable("registry", registries, exc) from None
    workers, admins = {}, {}
    for inst in found.instances:
        if APP_KEY in inst.metadata and inst.service == "worker":
            workers[inst.instance_id] = inst.metadata[APP_KEY]
        if ADMIN_KEY in inst.metadata:
            admins[inst.instance_id] = inst.metadata[ADMIN_KEY]
    return workers, admins


# What a sidecar's admin page may send back; more is not a sidecar's page.
MAX_PAGE_BYTES = 8 * 1024 * 1024
TIMEOUT = 3.0


class _Unusable(Exception):
    """A target that did not answer as what it was named; ``str()`` says how, for users."""


async def _worker_stats(name: str, address: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: WorkerAsyncStub = wpb_grpc.WorkerStub(channel)
        try:
            reply = await stub.Stats(wpb.StatsRequest(), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                problem = f"is unreachable ({exc.details()})"
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                problem = f"is not a worker (UNIMPLEMENTED: {exc.details()})"
            else:
                problem = f"did not answer Stats ({code.name}: {exc.details()})"
            return {"name": name, "address": address, "error": problem}
    return {"name": name, "address": address, **message_json(reply)}


def _endpoints_page(admin: str) -> dict[str, Any]:
    """GET /endpoints of a sidecar's admin address, or ``_Unusable`` saying what it is instead."""
    not_admin = "is not a sidecar's admin address"
    try:
        with urllib.request.urlopen(f"http://{admin}/endpoints", timeout=TIMEOUT) as page:
            body = page.read(MAX_PAGE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise _Unusable(f"{not_admin}: GET /endpoints answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise _Unusable(f"did not answer within {TIMEOUT:g}s") from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise _Unusable(f"is unreachable ({text})") from None
    except (http.client.HTTPException, ConnectionResetError):
        # An HTTP/2-only server (gRPC) answers an HTTP/1.1 request with frames or a reset.
        raise _Unusable(f"{not_admin}: it does not answer HTTP/1.1 (a gRPC port?)") from None
    except TimeoutError:
        raise _Unusable(f"did not answer within {TIMEOUT:g}s") from None
    except OSError as exc:
        raise _Unusable(f"is unreachable ({exc.strerror or exc})") from None
    if len(body) > MAX_PAGE_BYTES:
        raise _Unusable(f"{not_admin}: /endpoints is over {MAX_PAGE_BYTES // 2**20} MiB")
    try:
        data = json.loads(body)
    except ValueError:
        raise _Unusable(f"{not_admin}: /endpoints is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise _Unusable(f"{not_admin}: /endpoints has no services")
    return data


def _sidecar_stats(name: str, admin: str) -> dict[str, Any]:
    try:
        return {"name": name, "admin": admin, **_endpoints_page(admin)}
    except _Unusable as exc:
        return {"name": name, "admin": admin, "error": str(exc)}


def _worker_row(w: dict[str, Any]) -> dict[str, Any]:
    if "error" in w:
        return {"name": w["name"], "address": w["address"], "requests": w["error"]}
    methods = w.get("methods", [])
    total = sum(int(m.get("total", 0)) for m in methods) + int(w.get("echo_total", 0))
    failed = sum(int(m.get("failed", 0)) for m in methods)
    pools = w.get("pools", [])
    cache = w.get("cache", {})
    slowest = max((float(m.get("p99_ms", 0)) for m in methods), default=0.0)
    return {
        "name": w["name"],
        "address": w["address"],
        "requests": total,
        "failed": failed,
        "running": w.get("tasks_running", 0),
        "queued": w.get("tasks_queued", 0),
        "pool": " ".join(f"{p['name']}:{p.get('busy', 0)}/{p.get('size', 0)}" for p in pools),
        "cache": f"{cache.get('hits', 0)} hits / {cache.get('misses', 0)} misses",
        "p99": f"{slowest:.2f} ms",
        "uptime": f"{float(w.get('uptime_seconds', 0)):.0f}s",
    }


def _sidecar_rows(s: dict[str, Any]) -> list[dict[str, Any]]:
    if "error" in s:
        return [{"sidecar": s["name"], "service": "-", "endpoint": s["error"]}]
    rows = []
    for service, info in s.get("services", {}).items():
        for e in info.get("endpoints", []):
            rows.append(
                {
                    "sidecar": s["name"],
                    "service": service,
                    "endpoint": e.get("instance_id"),
                    "state": e.get("state", "-"),
                    "in_flight": e.get("in_flight", "-"),
                    "ewma": f"{e.get('ewma_ms', 0)} ms",
                    "requests": e.get("requests", "-"),
                    "failures": e.get("failures", "-"),
                    "ejected": e.get("ejected", "-"),
                }
            )
    return rows


@click.command()
@registry_option()
@click.option(
    "--worker",
    "extra_workers",
    type=ADDRESS,
    multiple=True,
    help="Also a worker at this address (repeatable).",
)
@click.option(
    "--sidecar-admin",
    "extra_admins",
    type=ADDRESS,
    multiple=True,
    help="Also the sidecar with this admin address, e.g. the client's (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(
    registry: tuple[str, ...],
    extra_workers: tuple[str, ...],
    extra_admins: tuple[str, ...],
    as_json: bool,
) -> None:
    """Per-worker and per-sidecar statistics of a running mesh."""
    workers, admins = asyncio.run(find_targets(registry))
    workers.update({addr: addr for addr in extra_workers})
    admins.update({addr: addr for addr in extra_admins})
    if not workers and not admins:
        raise UserError(f"registry {', '.join(registry)} lists no worker or sidecar to ask")

    async def gather() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_worker_stats(n, a) for n, a in workers.items())))

    worker_stats = asyncio.run(gather()) if workers else []
    sidecar_stats = [_sidecar_stats(n, a) for n, a in admins.items()]
    # Found through the registry, a target that fails is a row saying so; named on the
    # command line, it is the user's mistake (a wrong port, say): one line, exit 2.
    for flag, named, found, key in (
        ("--worker", extra_workers, worker_stats, "address"),
        ("--sidecar-admin", extra_admins, sidecar_stats, "admin"),
    ):
        for entry in found:
            if "error" in entry and entry[key] in named:
                raise UserError(f"{flag} {entry[key]} {entry['error']}")
    if as_json:
        emit_json({"workers": worker_stats, "sidecars": sidecar_stats})
        return
    emit_table(
        "workers",
        [
            ("name", "WORKER"),
            ("address", "ADDRESS"),
            ("requests", "REQUESTS"),
            ("failed", "FAILED"),
            ("running", "RUNNING"),
            ("queued", "QUEUED"),
            ("pool", "POOL busy/size"),
            ("cache", "CACHE"),
            ("p99", "p99"),
            ("uptime", "UP"),
        ],
        [_worker_row(w) for w in worker_stats],
    )
    emit_table(
        "sidecars",
        [
            ("sidecar", "SIDECAR"),
            ("service", "ROUTES TO"),
            ("endpoint", "ENDPOINT"),
            ("state", "STATE"),
            ("in_flight", "IN FLIGHT"),
            ("ewma", "EWMA"),
            ("requests", "REQUESTS"),
            ("failures", "FAILURES"),
            ("ejected", "EJECTED"),
        ],
        [row for s in sidecar_stats for row in _sidecar_rows(s)],
    )
