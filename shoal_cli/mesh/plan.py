"""What a local mesh consists of: which processes, on which ports, with which flags.

Pure: it builds command lines and checks ports, it starts nothing. Ports are
fixed for the life of the mesh (``--base-port`` and offsets, or free ones picked
once for ``--base-port 0``), so a restarted child comes back on its old address
and every sidecar that knew it still finds it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_cli.mesh.supervisor import ChildSpec, Restart
from shoal_cli.mesh.trust import MeshTrust
from shoal_core.tracing import DEFAULT_SAMPLE

__all__ = ["MeshPlan", "PortInUse", "Tracing", "child_flags", "plan_mesh"]

WORKER_SERVICE = "worker"
# Offsets from the base port, so `--base-port 7700` gives the documented layout.
# A worker's sidecar takes other sidecars' calls on SIDECARS + i (the address it
# registers) and its worker's own outbound calls on SIDECAR_OUTBOUND + i.
CLIENT, CLIENT_ADMIN, IDENTITY, DASHBOARD, TRACES = 1, 2, 3, 4, 5
WORKERS, SIDECARS, SIDECAR_ADMINS = 100, 200, 300
SIDECAR_OUTBOUND = 400
SHOAL = (sys.executable, "-m", "shoal_cli.main")
# Echo, demo functions and a few harmless commands, so a new mesh has work to show.
DEMO_WORKER_CONFIG = Path(__file__).with_name("worker.yaml")


class PortInUse(RuntimeError):
    """A port the mesh needs is taken."""


@dataclass(frozen=True, kw_only=True)
class Tracing:
    """Where the mesh's spans go (``None``: to the dashboard, which shows them) and the
    share of new traces kept."""

    endpoint: str | None = None
    sample: float = DEFAULT_SAMPLE


@dataclass(frozen=True)
class MeshPlan:
    """The children of one mesh, grouped by role, plus the addresses users call."""

    registry: ChildSpec
    workers: tuple[ChildSpec, ...]
    sidecars: tuple[ChildSpec, ...]
    client: ChildSpec
    registry_address: str
    client_address: str
    client_admin: str
    worker_addresses: tuple[str, ...]
    sidecar_admins: tuple[str, ...]
    # The live web page of the mesh (`shoal dashboard`), and where it is.
    dashboard: ChildSpec
    dashboard_url: str
    tracing: Tracing
    # With mTLS (the default): the identity server every other child certifies at.
    identity: ChildSpec | None = None
    trust: MeshTrust | None = None

    def start_order(self) -> list[ChildSpec]:
        first = [] if self.identity is None else [self.identity]
        return [*first, self.registry, *self.workers, *self.sidecars, self.client, self.dashboard]


def child_flags(command: str, section: Mapping[str, Any]) -> list[str]:
    """Flags for a child from its mesh-file section, leaving out what the environment sets.

    Children inherit the environment, and a flag would beat an environment variable:
    skipping those keeps the documented precedence (flag > env > file > default).
    """
    flags: list[str] = []
    for key, value in section.items():
        if f"SHOAL_{command}_{key}".upper() in os.environ:
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _check_free(port: int) -> None:
    with socket.socket() as probe:
        # As the servers themselves do: connections of an earlier mesh lingering in
        # TIME_WAIT must not make a free port look taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise PortInUse(
                f"port {port} on 127.0.0.1 is in use (another mesh running? "
                "pick another --base-port, or 0 for free ports)"
            ) from None


def _ports(base: int, workers: int) -> dict[str, list[int]]:
    if base == 0:
        pick = _free_port
        return {
            "registry": [pick()],
            "client": [pick()],
            "client_admin": [pick()],
            "identity": [pick()],
            "dashboard": [pick()],
            "traces": [pick()],
            "workers": [pick() for _ in range(workers)],
            "sidecars": [pick() for _ in range(workers)],
            "outbound": [pick() for _ in range(workers)],
            "admins": [pick() for _ in range(workers)],
        }
    ports = {
        "registry": [base],
        "client": [base + CLIENT],
        "client_admin": [base + CLIENT_ADMIN],
        "identity": [base + IDENTITY],
        "dashboard": [base + DASHBOARD],
        "traces": [base + TRACES],
        "workers": [base + WORKERS + i for i in range(workers)],
        "sidecars": [base + SIDECARS + i for i in range(workers)],
        "outbound": [base + SIDECAR_OUTBOUND + i for i in range(workers)],
        "admins": [base + SIDECAR_ADMINS + i for i in range(workers)],
    }
    for group in ports.values():
        for port in group:
            _check_free(port)
    return ports


def plan_mesh(
    *,
    workers: int,
    base_port: int,
    lb: str | None,
    restart: Restart,
    mesh_file: Path | None,
    sections: Mapping[str, Mapping[str, Any]],
    trust: MeshTrust | None = None,
    state_dir: Path | None = None,
    tracing: Tracing | None = None,
) -> MeshPlan:
    """Lay out a mesh of ``workers`` workers, each behind its own sidecar; with ``trust``,
    an identity server too, and every mesh hop on mTLS; the registry keeps what must
    outlive its restarts (the policy an operator set) in ``state_dir``; workers and
    sidecars trace as ``tracing`` says (by default to the dashboard, which shows them)."""
    tracing = tracing or Tracing()
    ports = _ports(base_port, workers)
    host = "127.0.0.1"
    registry = f"{host}:{ports['registry'][0]}"
    identity_spec = None
    if trust is not None:
        trust = dataclasses.replace(trust, identity_address=f"{host}:{ports['identity'][0]}")
        identity_spec = ChildSpec(
            name="identity",
            restart=restart,
            argv=[
                *SHOAL,
                "identity",
                "--ca",
                str(trust.ca_dir),
                "--listen",
                trust.identity_address,
            ],
        )

    traces = f"{host}:{ports['traces'][0]}"
    trace_endpoint = tracing.endpoint or f"http://{traces}"

    def env(role: str) -> dict[str, str]:
        return {} if trust is None else trust.env(role)

    def traced(role: str | None) -> dict[str, str]:
        """The environment of a child that records spans: a sidecar (with ``role``'s
        identity) or a worker (none: it is reached only by its sidecar, on loopback)."""
        found = {
            "SHOAL_OTLP_ENDPOINT": trace_endpoint,
            "SHOAL_TRACE_SAMPLE": f"{tracing.sample:g}",
        }
        return {**({} if role is None else env(role)), **found}

    mesh_config = ["--config", str(mesh_file)] if mesh_file is not None else []
    lb_flags = ["--lb", lb] if lb else []
    registry_spec = ChildSpec(
        name="registry",
        restart=restart,
        argv=[
            *SHOAL,
            "registry",
            "--listen",
            registry,
            *mesh_config,
            *(["--state-dir", str(state_dir)] if state_dir is not None else []),
        ],
        env=env("registry"),
    )
    worker_specs, sidecar_specs, worker_addrs, admins = [], [], [], []
    worker_section = dict(sections.get("worker", {}))
    worker_section.setdefault("config", str(DEMO_WORKER_CONFIG))
    worker_flags = child_flags("worker", worker_section)
    sidecar_flags = child_flags("sidecar", sections.get("sidecar", {}))
    for i in range(workers):
        app = f"{host}:{ports['workers'][i]}"
        admin = f"{host}:{ports['admins'][i]}"
        worker_addrs.append(app)
        admins.append(admin)
        worker_specs.append(
            ChildSpec(
                name=f"worker-{i + 1}",
                restart=restart,
                argv=[*SHOAL, "worker", "--listen", app, *worker_flags],
                env=traced(None),
            )
        )
        sidecar_specs.append(
            ChildSpec(
                name=f"sidecar-{i + 1}",
                restart=restart,
                argv=[
                    *SHOAL,
                    "sidecar",
                    "--listen",
                    f"{host}:{ports['outbound'][i]}",
                    "--inbound",
                    f"{host}:{ports['sidecars'][i]}",
                    "--registry",
                    registry,
                    "--service",
                    WORKER_SERVICE,
                    "--app",
                    app,
                    "--admin",
                    admin,
                    *sidecar_flags,
                    *lb_flags,
                ],
                env=traced(WORKER_SERVICE),
            )
        )
    client = f"{host}:{ports['client'][0]}"
    client_admin = f"{host}:{ports['client_admin'][0]}"
    client_spec = ChildSpec(
        name="client-sidecar",
        restart=restart,
        argv=[
            *SHOAL,
            "sidecar",
            "--listen",
            client,
            "--registry",
            registry,
            "--admin",
            client_admin,
            *sidecar_flags,
            *lb_flags,
        ],
        env=traced("client"),
    )
    dashboard = f"{host}:{ports['dashboard'][0]}"
    dashboard_spec = ChildSpec(
        name="dashboard",
        restart=restart,
        # The client sidecar is not registered: named, its calls into the mesh show too.
        argv=[
            *SHOAL,
            "dashboard",
            "--registry",
            registry,
            "--listen",
            dashboard,
            "--scrape",
            client_admin,
            # Unless spans go elsewhere, the dashboard receives them and shows them.
            *([] if tracing.endpoint else ["--otlp-listen", traces]),
        ],
        # It watches the registry as an operator, as `shoal ls` does.
        env=env("operator"),
    )
    return MeshPlan(
        registry=registry_spec,
        workers=tuple(worker_specs),
        sidecars=tuple(sidecar_specs),
        client=client_spec,
        registry_address=registry,
        client_address=client,
        client_admin=client_admin,
        worker_addresses=tuple(worker_addrs),
        sidecar_admins=tuple(admins),
        dashboard=dashboard_spec,
        dashboard_url=f"http://{dashboard}/",
        tracing=tracing,
        identity=identity_spec,
        trust=trust,
    )
