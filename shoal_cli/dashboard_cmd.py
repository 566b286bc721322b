"""``shoal dashboard``: a live web page of a running mesh, served by this process."""

from __future__ import annotations

import asyncio
import logging

import click

from shoal_cli.errors import UserError
from shoal_cli.operator import operator_identity
from shoal_cli.options import ADDRESS, LISTEN, grace_option, log_level_option
from shoal_cli.registry_ops import registry_option
from shoal_core.lifecycle import serve
from shoal_core.logs import setup_logging

__all__ = ["dashboard"]


@click.command()
@registry_option()
@click.option(
    "--listen",
    type=LISTEN,
    default="127.0.0.1:9390",
    show_default=True,
    help="Address of the web page (port 0 picks a free one). Loopback unless you "
    "mean to show the mesh to your network.",
)
@click.option(
    "--scrape",
    type=ADDRESS,
    multiple=True,
    help="Also read the figures of the sidecar with this admin address, e.g. the "
    "client's, which is not registered (repeatable).",
)
@click.option(
    "--otlp-listen",
    type=LISTEN,
    default=None,
    metavar="HOST:PORT",
    help="Also receive traces on this address, over OTLP/gRPC (point components' "
    "--otlp-endpoint at http://HOST:PORT), and show the recent ones. Plaintext.",
)
@grace_option(2.0, "Seconds open pages get to close on SIGTERM/SIGINT.")
@log_level_option()
def dashboard(
    registry: tuple[str, ...],
    listen: str,
    scrape: tuple[str, ...],
    otlp_listen: str | None,
    grace: float,
    log_level: str | None,
) -> None:
    """Serve a live web page of the mesh: services, instances, calls, denials, events.

    Instances come from the registry's Watch (as an operator, over mTLS when this
    machine knows how, as for `shoal ls`); figures from every sidecar's /metrics,
    read each second; traces, with --otlp-listen, from components that send them
    there. The page updates itself (server-sent events)."""
    from shoal_cli.dashboard.server import DashboardServer

    try:
        setup_logging(log_level)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    # httpx says every request at INFO: a line per sidecar each second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A broken SHOAL_TRUST_BUNDLE or token file is a mistake to say now, in one line. The
    # identity itself is looked up at each connection: a mesh started later is found.
    operator_identity(registry)
    # The page names the registry as given: its replicas, comma-separated.
    server = DashboardServer(listen, ",".join(registry), scrape=scrape, otlp_listen=otlp_listen)

    def ready() -> None:
        # The URL stays the word after "serving on": `shoal up` reads it there.
        traces = server.otlp_address
        also = f" (receiving traces on {traces}, OTLP/gRPC)" if traces else ""
        click.echo(f"shoal dashboard serving on {server.url}{also}")

    asyncio.run(serve(server, grace=grace, on_started=ready))
