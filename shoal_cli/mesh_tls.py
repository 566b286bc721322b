"""``--identity-server`` and friends: how a mesh process gets and keeps its certificate.

A process given an identity server, a trust bundle and a join token (``SHOAL_TOKEN``,
or ``--token-file``: never a flag's value, which ``ps`` shows) certifies before it
serves and renews in the background. The trust domain is read from the bundle's roots,
so there is nothing else to configure.

grpcio is imported only where a grpcio process certifies (``start_keeper``): the sidecar
takes these options too, and its process does not load grpcio at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from identity.ca import trust_domain_of
from identity.spiffe import SpiffeId
from identity.workload import Credentials
from shoal_cli.errors import UserError
from shoal_cli.options import ADDRESS
from shoal_core.certifying import MeshIdentity
from shoal_core.renewal import CertificateKeeper

__all__ = ["identity_options", "mesh_identity", "start_keeper"]

F = TypeVar("F", bound=Callable[..., Any])
_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


def identity_options() -> Callable[[F], F]:
    """``--identity-server``, ``--trust-bundle`` and ``--token-file``; the command passes
    them to ``MeshIdentity.from_options``."""

    def wrap(command: F) -> F:
        for option in reversed(
            [
                click.option(
                    "--identity-server",
                    type=ADDRESS,
                    envvar="SHOAL_IDENTITY_SERVER",
                    help="Where to certify (shoal identity); with it, mTLS on the mesh port.",
                ),
                click.option(
                    "--trust-bundle",
                    type=_FILE,
                    envvar="SHOAL_TRUST_BUNDLE",
                    help="The mesh's roots (bundle.crt of `shoal ca init`).",
                ),
                click.option(
                    "--token-file",
                    type=_FILE,
                    envvar="SHOAL_TOKEN_FILE",
                    help="A file holding the join token (or set SHOAL_TOKEN).",
                ),
            ]
        ):
            command = option(command)
        return command

    return wrap


def mesh_identity(
    identity_server: str | None, trust_bundle: Path | None, token_file: Path | None
) -> MeshIdentity | None:
    """The settings given, None for none; a half-given set is a user error."""
    token = token_file.read_text().strip() if token_file else os.environ.get("SHOAL_TOKEN", "")
    if identity_server is None and trust_bundle is None:
        return None
    if identity_server is None or trust_bundle is None or not token:
        raise UserError(
            "mTLS needs --identity-server, --trust-bundle and a token (SHOAL_TOKEN or --token-file)"
        )
    bundle = trust_bundle.read_bytes()
    try:
        trust_domain = trust_domain_of(bundle)
    except ValueError as exc:
        raise UserError(f"{trust_bundle}: {exc}") from None
    return MeshIdentity(identity_server, bundle, trust_domain, token)


async def start_keeper(mesh: MeshIdentity, expected: SpiffeId | None = None) -> CertificateKeeper:
    """Certified through grpcio and renewing; a refused token is a user error, in one
    line, and so is a token for another identity than ``expected``."""
    import grpc

    from shoal_core.certify_client import certify

    async def certify_once(held: Credentials | None) -> Credentials:
        # The newest bundle we hold: after a root rotation the identity server's own
        # leaf chains to a root the bundle given at start-up may not have.
        try:
            return await certify(
                mesh.server,
                bundle_pem=mesh.bundle_pem if held is None else held.bundle_pem,
                trust_domain=mesh.trust_domain,
                token=mesh.token,
                current=held,
            )
        except grpc.aio.AioRpcError as exc:
            if held is None:
                raise
            # In one line, for the keeper's log (grpcio's own text spans several).
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None

    keeper = CertificateKeeper(certify_once)
    try:
        held = await keeper.start()
    except grpc.aio.AioRpcError as exc:
        raise UserError(
            f"cannot certify at {mesh.server}: {exc.code().name}: {exc.details()}"
        ) from None
    try:
        check_admitted(held, expected)
    except UserError:
        await keeper.close()
        raise
    return keeper


def check_admitted(held: Credentials, expected: SpiffeId | None) -> None:
    if expected is not None and held.identity != expected:
        raise UserError(f"the token admits {held.identity}, not {expected}")
