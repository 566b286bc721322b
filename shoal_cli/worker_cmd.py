"""``shoal worker``: run a worker node (process pool, commands, response cache)."""

from __future__ import annotations

import asyncio

import click

from shoal_cli.errors import UserError
from shoal_cli.options import (
    LISTEN,
    grace_option,
    isolation_option,
    log_level_option,
    metrics_option,
    trace_options,
    trace_settings,
)
from shoal_core.lifecycle import serve
from shoal_core.logs import setup_logging

__all__ = ["worker"]

SERVICE = "worker"  # what its spans call this process (the resource's service.name)


@click.command()
@click.option(
    "--listen",
    type=LISTEN,
    default="127.0.0.1:7800",
    show_default=True,
    help="Address for the gRPC API (port 0 picks a free one).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML allowlist of commands, functions and pools (default: Echo and demo functions).",
)
@metrics_option()
@trace_options()
@isolation_option()
@grace_option(10.0, "Seconds in-flight work may run on SIGTERM/SIGINT before it is stopped.")
@log_level_option()
def worker(
    listen: str,
    config_path: str | None,
    metrics_listen: str | None,
    otlp_endpoint: str | None,
    trace_sample: float,
    exit_when_isolated: float | None,
    grace: float,
    log_level: str | None,
) -> None:
    """Run a worker node."""
    from worker_node import WorkerServer, load_config
    from worker_node.poolproc import PoolStartError

    trace = trace_settings(otlp_endpoint, trace_sample, SERVICE)
    try:
        setup_logging(log_level)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    config = load_config(config_path)
    server = WorkerServer(listen, config, metrics_listen=metrics_listen, trace=trace)

    def ready() -> None:
        click.echo(f"shoal worker serving on {server.address}")

    try:
        asyncio.run(
            serve(server, grace=grace, on_started=ready, exit_when_isolated=exit_when_isolated)
        )
    except PoolStartError as exc:
        raise UserError(str(exc)) from exc
