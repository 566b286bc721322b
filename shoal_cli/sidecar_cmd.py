"""``shoal sidecar``: run a sidecar proxy beside an app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
import pydantic

from proxy_sidecar import SidecarConfig, SidecarServer, load_config
from proxy_sidecar.errors import SidecarError
from shoal_cli.errors import UserError
from shoal_cli.mesh_tls import identity_options, mesh_identity
from shoal_cli.options import (
    ADDRESS,
    LISTEN,
    REGISTRIES,
    grace_option,
    isolation_option,
    log_level_option,
    trace_options,
    trace_settings,
)
from shoal_core.lifecycle import serve
from shoal_core.logs import setup_logging

__all__ = ["sidecar"]


@click.command()
@click.option(
    "--listen",
    type=LISTEN,
    default="127.0.0.1:7701",
    show_default=True,
    help="Where the app calls: the app-facing listener, routed into the mesh "
    "(port 0 picks a free one).",
)
@click.option(
    "--registry",
    type=REGISTRIES,
    default="127.0.0.1:7700",
    show_default=True,
    help="The registry to watch and register with; several replicas of one, "
    "comma-separated, are used in turn: when one fails, the watch resumes and the "
    "heartbeats go on at the next.",
)
@click.option("--service", default=None, help="Mesh service name of the co-located app.")
@click.option("--app", type=ADDRESS, default=None, help="Address of the co-located app.")
@click.option(
    "--grpc-service",
    "grpc_services",
    multiple=True,
    help="gRPC service the app serves (repeatable); default: ask the app's reflection.",
)
@click.option(
    "--inbound",
    type=LISTEN,
    default=None,
    help="Where other sidecars call, with --service/--app: the mesh-facing listener, "
    "delivered to the app only.",
)
@click.option(
    "--advertise",
    type=ADDRESS,
    default=None,
    help="Address registered for other sidecars to reach this one (default: --inbound).",
)
@click.option("--lb", default=None, help="Default load balancer (e.g. round_robin, peak_ewma).")
@click.option(
    "--admin", type=LISTEN, default=None, help="Serve /healthz, /endpoints and /metrics here."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file with balancing, retry, outlier and membership settings.",
)
@identity_options()
@trace_options()
@isolation_option()
@grace_option(5.0)
@log_level_option()
def sidecar(
    listen: str,
    registry: tuple[str, ...],
    service: str | None,
    app: str | None,
    grpc_services: tuple[str, ...],
    inbound: str | None,
    advertise: str | None,
    lb: str | None,
    admin: str | None,
    config_path: str | None,
    identity_server: str | None,
    trust_bundle: Path | None,
    token_file: Path | None,
    otlp_endpoint: str | None,
    trace_sample: float,
    exit_when_isolated: float | None,
    grace: float,
    log_level: str | None,
) -> None:
    """Forward the app's gRPC calls into the mesh; with --service/--app, register the app.

    With --identity-server, calls between sidecars and to the registry are mutual TLS;
    without, plaintext."""
    try:
        setup_logging(log_level)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    config = load_config(config_path)
    if lb is not None or grpc_services:
        data = config.model_dump()
        if lb is not None:
            data["lb"] = lb
        if grpc_services:
            data["membership"]["grpc_services"] = grpc_services
        try:
            config = SidecarConfig.model_validate(data)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            raise UserError(f"--grpc-service: {first['msg']}") from None
    try:
        server = SidecarServer(
            listen,
            registry,
            config,
            service=service,
            app=app,
            inbound=inbound,
            advertise=advertise,
            admin=admin,
            mesh=mesh_identity(identity_server, trust_bundle, token_file),
            # Named for real once the sidecar knows its identity (SidecarServer.start).
            trace=trace_settings(otlp_endpoint, trace_sample, "sidecar"),
        )
    except SidecarError as exc:
        raise UserError(str(exc)) from exc

    def ready() -> None:
        line = f"shoal sidecar serving on {server.address}"
        if server.inbound_address is not None:
            line += f" (inbound on {server.inbound_address})"
        if server.admin_port:
            line += f" (admin on port {server.admin_port})"
        click.echo(line)

    try:
        asyncio.run(
            serve(server, grace=grace, on_started=ready, exit_when_isolated=exit_when_isolated)
        )
    except SidecarError as exc:
        raise UserError(str(exc)) from exc
