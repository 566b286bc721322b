"""``shoal up``: a whole mesh on this machine with one command."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from shoal_cli.errors import UserError
from shoal_cli.mesh.config import MeshFile, config_option
from shoal_cli.mesh.plan import MeshPlan, PortInUse, Tracing, plan_mesh
from shoal_cli.mesh.supervisor import Restart, StartError
from shoal_cli.mesh.trust import make_trust
from shoal_cli.mesh.up import MeshNotReady, RunningMesh, run_mesh
from shoal_cli.operator import forget_mesh, record_mesh
from shoal_cli.output import say
from shoal_cli.render import emit_table
from shoal_core.tracing import DEFAULT_SAMPLE

__all__ = ["up"]


def _say(message: str) -> None:
    say(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _show(mesh: RunningMesh) -> None:
    plan = mesh.plan
    rows: list[dict[str, Any]] = []
    roles = [
        *([("identity", [plan.identity])] if plan.identity is not None else []),
        ("registry", [plan.registry]),
        ("worker", plan.workers),
        ("sidecar", plan.sidecars),
        ("client sidecar", [plan.client]),
        ("dashboard", [plan.dashboard]),
    ]
    for role, specs in roles:
        for spec in specs:
            child = mesh.by_name[spec.name]
            rows.append(
                {
                    "role": role,
                    "name": spec.name,
                    "address": child.address,
                    "pid": child.pid,
                    "log": str(child.log_path),
                }
            )
    emit_table(
        f"shoal mesh: {len(plan.workers)} workers, ready",
        [
            ("role", "ROLE"),
            ("name", "NAME"),
            ("address", "ADDRESS"),
            ("pid", "PID"),
            ("log", "LOG"),
        ],
        rows,
    )
    via, reg = plan.client_address, plan.registry_address
    if plan.trust is not None:
        say(
            f"\nmTLS on every mesh hop; the mesh's CA is in {plan.trust.ca_dir}. Operator "
            "commands on this machine find their certificate by themselves."
        )
    else:
        say("\nPLAINTEXT between mesh components (--insecure): not for a network you do not own.")
    say(f"\nDashboard: {plan.dashboard_url} (the mesh live: instances, calls, denials, traces)")
    sample = f"{plan.tracing.sample:.0%} of new traces kept"
    if plan.tracing.endpoint is None:
        say(f"Traces: to the dashboard, {sample} (--trace-sample, --otlp-endpoint).")
    else:
        say(f"Traces: to {plan.tracing.endpoint}, {sample}.")
    say(f"""
Call the mesh through the client sidecar at {via}, for example:
  shoal call upper --data hello --via {via}
  shoal exec --via {via} -- say hello from the mesh
  shoal ls --registry {reg}        shoal watch --registry {reg}
  shoal stats --registry {reg} --sidecar-admin {plan.client_admin}
  shoal bench --via {via} --registry {reg}
Any gRPC client can use {via} as the address of shoal.worker.v1.Worker.
Press Ctrl-C to stop everything (sidecars drain and deregister first).""")


@click.command()
@config_option()
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=3,
    show_default=True,
    help="How many workers, each behind its own sidecar.",
)
@click.option(
    "--base-port",
    type=click.IntRange(0, 65000),
    default=7700,
    show_default=True,
    help="Registry port; the others follow it (0: free ports).",
)
@click.option("--lb", default=None, help="Load balancer of every sidecar (default: round_robin).")
@click.option(
    "--restart",
    type=click.Choice([r.value for r in Restart]),
    default="on-failure",
    show_default=True,
    help="Restart policy of every child.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where child logs go (default: a new temporary folder).",
)
@click.option("--demo", is_flag=True, help="Send traffic and show live rates and spread.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Plaintext between mesh components (default: mTLS with a CA made for the mesh).",
)
@click.option(
    "--otlp-endpoint",
    default=None,
    metavar="URL",
    help="Send the mesh's spans to this OTLP/gRPC collector (http://HOST:4317) instead of "
    "to the dashboard.",
)
@click.option(
    "--trace-sample",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help=f"Share of new traces kept (default: 1 with --demo, else {DEFAULT_SAMPLE:g}).",
)
@click.pass_context
def up(
    ctx: click.Context,
    workers: int,
    base_port: int,
    lb: str | None,
    restart: str,
    run_dir: str | None,
    demo: bool,
    insecure: bool,
    otlp_endpoint: str | None,
    trace_sample: float | None,
) -> None:
    """Run a registry, workers with their sidecars and a client sidecar on loopback."""
    mesh_file: MeshFile | None = None
    mesh_path: Path | None = None
    if "shoal.mesh_file" in ctx.meta:
        path_text, mesh_file = ctx.meta["shoal.mesh_file"]
        mesh_path = Path(path_text).resolve()
    sections = mesh_file.default_map() if mesh_file is not None else {}
    log_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="shoal-up-"))
    if otlp_endpoint is not None and not otlp_endpoint.startswith("http://"):
        # The sidecars send spans in plaintext, to a collector beside them.
        raise UserError(f"--otlp-endpoint must be http://HOST:PORT, not {otlp_endpoint!r}")
    if trace_sample is None:
        trace_sample = 1.0 if demo else DEFAULT_SAMPLE
    trust = None if insecure else make_trust(log_dir)
    try:
        plan: MeshPlan = plan_mesh(
            workers=workers,
            base_port=base_port,
            lb=lb,
            restart=Restart(restart),
            mesh_file=mesh_path,
            sections=sections,
            trust=trust,
            state_dir=log_dir / "registry-state",
            tracing=Tracing(endpoint=otlp_endpoint, sample=trace_sample),
        )
    except PortInUse as exc:
        raise UserError(str(exc)) from None
    _say(f"starting a mesh of {workers} workers; logs in {log_dir}")
    while_running = None
    if demo:
        from shoal_cli.mesh.demo import start_demo

        while_running = start_demo
    record = None
    if plan.trust is not None:
        record = record_mesh(
            plan.registry_address,
            plan.trust.identity_address,
            plan.trust.bundle,
            plan.trust.token_file("operator"),
        )
    try:
        asyncio.run(
            run_mesh(plan, log_dir, on_event=_say, on_ready=_show, while_running=while_running)
        )
    except (StartError, MeshNotReady) as exc:
        raise UserError(str(exc)) from None
    finally:
        if record is not None:
            forget_mesh(record)
    _say("mesh stopped; no process left running")
