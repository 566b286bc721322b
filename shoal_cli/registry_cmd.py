"""``shoal registry``: run a registry; ``shoal registry-demo``: watch one at work."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import click

from identity.authz import Policy, load_policy
from identity.spiffe import SpiffeId
from registry_service import RegistryConfig, RegistryServer
from registry_service.backend import Backend
from registry_service.errors import StoreUnavailable
from registry_service.xds.policy import XdsPolicies
from registry_service.xds.policy import load as load_xds_policies
from shoal_cli.errors import UserError, WorkFailed
from shoal_cli.mesh.config import config_option
from shoal_cli.mesh_tls import identity_options, mesh_identity, start_keeper
from shoal_cli.options import LISTEN, grace_option, log_level_option, metrics_option
from shoal_cli.store_options import EtcdStore, parse_store, store_options
from shoal_core.addresses import parse_address
from shoal_core.certifying import MeshIdentity
from shoal_core.lifecycle import serve
from shoal_core.logs import setup_logging
from shoal_core.tls import server_credentials

__all__ = ["registry", "registry_demo"]

logger = logging.getLogger(__name__)

_SECONDS = click.FloatRange(min=0.0, min_open=True)
_DEFAULTS = RegistryConfig()


@click.command()
@config_option()
@click.option(
    "--listen",
    type=LISTEN,
    default="127.0.0.1:7700",
    show_default=True,
    help="Address for the gRPC API (port 0 picks a free one).",
)
@metrics_option()
@click.option(
    "--ttl-default",
    type=_SECONDS,
    default=10.0,
    show_default=True,
    help="Lease TTL in seconds when a caller asks for none.",
)
@click.option("--ttl-min", type=_SECONDS, default=1.0, show_default=True)
@click.option("--ttl-max", type=_SECONDS, default=300.0, show_default=True)
@click.option(
    "--sweep-interval",
    type=_SECONDS,
    default=1.0,
    show_default=True,
    help="Seconds between expiry sweeps.",
)
@click.option(
    "--removal-grace",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="Seconds a lapsed instance stays listed as unhealthy before removal.",
)
@click.option(
    "--preservation-share",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.5,
    show_default=True,
    help="Share of instances lapsing within one window that holds evictions.",
)
@click.option("--preservation-window", type=_SECONDS, default=15.0, show_default=True)
@click.option(
    "--preservation-max",
    type=_SECONDS,
    default=60.0,
    show_default=True,
    help="Longest time evictions stay held.",
)
@click.option(
    "--max-instances",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_instances,
    show_default=True,
    help="Instances the registry holds in all; Register beyond gets RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-instances-per-service",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_instances_per_service,
    show_default=True,
    help="Instances one service may have.",
)
@click.option(
    "--max-instances-bytes",
    type=click.IntRange(min=64 * 1024),
    default=_DEFAULTS.max_instances_bytes,
    show_default=True,
    help="Bytes all instances' data (ids, addresses, metadata) may hold.",
)
@click.option(
    "--history-bytes",
    type=click.IntRange(min=64 * 1024),
    default=_DEFAULTS.history_bytes,
    show_default=True,
    help="Bytes the change history (for resuming watchers) may hold.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The mesh's authorization policy until `shoal policy set` replaces it "
    "(default: allow all; see examples/policy.yaml).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to keep what must outlive a restart (the policy an operator set); "
    "without it a restarted registry starts from --policy.",
)
@click.option(
    "--xds-config",
    type=click.Path(dir_okay=False),
    envvar="SHOAL_XDS_CONFIG",
    default=None,
    help="A sidecar config (YAML) whose per-service policies xDS clients are served: "
    "its services are xds:/// target names; what gRPC cannot do is logged (env "
    "SHOAL_XDS_CONFIG).",
)
@store_options()
@identity_options()
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    envvar="SHOAL_REGISTRY_TLS_NAMES",
    help="A host name or IP address clients dial this registry by, for its certificate "
    "(repeatable; default: --listen's host unless it is a wildcard). Proxyless xDS "
    "clients check it (env SHOAL_REGISTRY_TLS_NAMES, space-separated).",
)
@grace_option(5.0)
@log_level_option()
def registry(
    listen: str,
    metrics_listen: str | None,
    ttl_default: float,
    ttl_min: float,
    ttl_max: float,
    sweep_interval: float,
    removal_grace: float,
    preservation_share: float,
    preservation_window: float,
    preservation_max: float,
    max_instances: int,
    max_instances_per_service: int,
    max_instances_bytes: int,
    history_bytes: int,
    policy_file: str | None,
    state_dir: Path | None,
    xds_config: str | None,
    store: str,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
    identity_server: str | None,
    trust_bundle: Path | None,
    token_file: Path | None,
    tls_names: tuple[str, ...],
    grace: float,
    log_level: str | None,
) -> None:
    """Run the service registry (mTLS with --identity-server; plaintext without)."""
    try:
        setup_logging(log_level)
        config = RegistryConfig(
            ttl_default=ttl_default,
            ttl_min=ttl_min,
            ttl_max=ttl_max,
            sweep_interval=sweep_interval,
            removal_grace=removal_grace,
            preservation_share=preservation_share,
            preservation_window=preservation_window,
            preservation_max=preservation_max,
            max_instances=max_instances,
            max_instances_per_service=max_instances_per_service,
            max_instances_bytes=max_instances_bytes,
            history_bytes=history_bytes,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    etcd = parse_store(store, etcd_ca, etcd_cert, etcd_key)
    if etcd is not None and ttl_min < 1.0:
        raise UserError("--store etcd: etcd leases are whole seconds; --ttl-min must be >= 1")
    mesh = mesh_identity(identity_server, trust_bundle, token_file)
    if mesh is not None:
        mesh = dataclasses.replace(mesh, hosts=tls_names or _listen_host(listen))
    elif tls_names:
        raise UserError("--tls-name names an mTLS registry's certificate: give --identity-server")
    policy = None if policy_file is None else load_policy(policy_file)
    # After setup_logging: loading logs, once, each setting xDS cannot carry.
    xds_policies = None if xds_config is None else load_xds_policies(xds_config)
    try:
        asyncio.run(
            _run(
                listen,
                config,
                metrics_listen,
                mesh,
                grace,
                policy=policy,
                state_dir=state_dir,
                etcd=etcd,
                xds_policies=xds_policies,
            )
        )
    except StoreUnavailable as exc:  # etcd down or refusing us: not the user's typo
        raise WorkFailed(str(exc)) from None


async def _run(
    listen: str,
    config: RegistryConfig,
    metrics_listen: str | None,
    mesh: MeshIdentity | None,
    grace: float,
    *,
    policy: Policy | None = None,
    state_dir: Path | None = None,
    etcd: EtcdStore | None = None,
    xds_policies: XdsPolicies | None = None,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        backend = None
        if etcd is not None:
            from registry_service.etcd import EtcdClient
            from registry_service.etcd_store import EtcdBackend

            if etcd.tls is None:
                logger.warning(
                    "talking to etcd without TLS (--etcd-ca): whoever reaches %s may "
                    "read and change the mesh's state",
                    ",".join(etcd.endpoints),
                )
            client = await stack.enter_async_context(EtcdClient(etcd.endpoints, tls=etcd.tls))
            backend = EtcdBackend(config, client)
        await _serve(
            listen, config, metrics_listen, mesh, grace, policy, state_dir, backend, xds_policies
        )


def _listen_host(listen: str) -> tuple[str, ...]:
    host = parse_address(listen, allow_port_zero=True).host.strip("[]")
    return () if host in ("", "0.0.0.0", "::") else (host,)


async def _serve(
    listen: str,
    config: RegistryConfig,
    metrics_listen: str | None,
    mesh: MeshIdentity | None,
    grace: float,
    policy: Policy | None,
    state_dir: Path | None,
    backend: Backend | None,
    xds_policies: XdsPolicies | None,
) -> None:
    keeper = None
    if mesh is None:
        server = RegistryServer(
            listen,
            config,
            metrics_listen=metrics_listen,
            policy=policy,
            state_dir=state_dir,
            backend=backend,
            xds_policies=xds_policies,
        )
    else:
        keeper = await start_keeper(mesh, SpiffeId(mesh.trust_domain, "registry"))
        server = RegistryServer(
            listen,
            config,
            metrics_listen=metrics_listen,
            credentials=server_credentials(keeper.current),
            trust_domain=mesh.trust_domain,
            policy=policy,
            state_dir=state_dir,
            backend=backend,
            xds_policies=xds_policies,
        )

    def ready() -> None:
        # The line's last word is the address: supervisors and tests read it.
        click.echo(f"shoal registry serving on {server.address}", nl=True)
        if keeper is not None:
            logger.info("mTLS as %s", keeper.current().identity)
        else:
            logger.warning(
                "running without mTLS: any process that reaches %s may change the mesh",
                server.address,
            )

    try:
        await serve(server, grace=grace, on_started=ready)
    finally:
        if keeper is not None:
            await keeper.close()


@click.command("registry-demo")
def registry_demo() -> None:
    """Start a registry, register instances, and narrate leases, watch and expiry."""
    from shoal_cli.registry_demo import run_registry_demo

    setup_logging("WARNING")
    asyncio.run(run_registry_demo(click.echo))
