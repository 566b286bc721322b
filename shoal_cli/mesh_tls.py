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

from identity.spiffe import SpiffeId
from identity.workload import Credentials
from shoal_cli.errors import UserError
from shoal_cli.options import ADDRESS
from shoal_core.certifying import CertifyFailed, MeshIdentity, check_admitted
from shoal_core.renewal import CertificateKeeper

__all__ = ["identity_options", "join_token", "mesh_identity", "start_keeper"]

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
    token = join_token(token_file)
    if identity_server is None and trust_bundle is None:
        return None
    if identity_server is None or trust_bundle is None or not token:
        raise UserError(
            "mTLS needs --identity-server, --trust-bundle and a token (SHOAL_TOKEN or --token-file)"
        )
    try:
        return MeshIdentity.load(identity_server, trust_bundle, token)
    except ValueError as exc:
        raise UserError(f"{trust_bundle}: {exc}") from None


def join_token(token_file: Path | None) -> str:
    """The token in ``token_file``, else in ``SHOAL_TOKEN`` (never a flag: ``ps`` shows
    those); "" for none."""
    return token_file.read_text().strip() if token_file else os.environ.get("SHOAL_TOKEN", "")


async def start_keeper(
    mesh: MeshIdentity,
    expected: SpiffeId | None = None,
    on_change: Callable[[Credentials], None] | None = None,
) -> CertificateKeeper:
    """Certified through grpcio and renewing, telling ``on_change`` of each leaf; a
    refused token (``CertifyFailed``) is a user error, in one line, and so is a token
    for another identity than ``expected``."""
    from shoal_core.certify_client import certify_as

    keeper = CertificateKeeper(lambda held: certify_as(mesh, held), on_change=on_change)
    held = await keeper.start()
    try:
        check_admitted(held, expected)
    except CertifyFailed:
        await keeper.close()
        raise
    return keeper
