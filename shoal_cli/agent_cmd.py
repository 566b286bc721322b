"""``shoal identity-agent``: keep a workload's certificate in files, renewed.

For programs that bring no Shoal code of their own and read their certificate from
disk: a proxyless gRPC client (``shoal xds-bootstrap --cert-dir``) above all. The agent
certifies with the workload's join token, writes the three files of
``identity.cert_files``, and renews them at about 70 % of each leaf's life for as long
as it runs, as every other mesh process renews the leaf it holds in memory. The key is
made here, and is on disk only in its 0600 file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from identity.cert_files import CertFiles
from identity.spiffe import SpiffeError, SpiffeId
from identity.workload import Credentials
from shoal_cli.errors import UserError
from shoal_cli.mesh_tls import identity_options, mesh_identity, start_keeper
from shoal_cli.options import log_level_option
from shoal_core.certifying import MeshIdentity
from shoal_core.lifecycle import ServiceBase, serve
from shoal_core.logs import setup_logging
from shoal_core.renewal import CertificateKeeper

__all__ = ["IdentityAgent", "identity_agent"]

logger = logging.getLogger(__name__)


class IdentityAgent(ServiceBase):
    """Certifies as ``mesh`` says and keeps ``files`` holding the current leaf."""

    def __init__(self, mesh: MeshIdentity, files: CertFiles, expected: SpiffeId | None) -> None:
        super().__init__()
        self.files = files
        self._mesh = mesh
        self._expected = expected
        self._started = False
        self._keeper: CertificateKeeper | None = None

    def current(self) -> Credentials:
        assert self._keeper is not None, "the agent has not started"
        return self._keeper.current()

    def _write(self, held: Credentials) -> None:
        if self._expected is not None and held.identity != self._expected:
            return  # start() refuses it: no file may claim to be the workload's
        try:
            self.files.write(held)
        except OSError as exc:
            if not self._started:
                raise  # nothing on disk at all: the agent must not say it keeps a leaf
            # The files on disk still hold the last leaf; the next renewal tries again.
            logger.error("cannot write %s: %s", self.files.directory, exc.strerror or exc)
            return
        logger.info(
            "wrote %s for %s, valid until %s",
            self.files.chain,
            held.identity,
            held.leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ"),
        )

    async def start(self) -> None:
        self._keeper = await start_keeper(self._mesh, self._expected, on_change=self._write)
        self._started = True

    async def close(self, grace: float | None = None) -> None:
        if self._keeper is not None:
            await self._keeper.close()
        self._closed_now()


@click.command("identity-agent")
@identity_options()
@click.option(
    "--service",
    default=None,
    help="The service the token must admit (refuse a token for any other).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SHOAL_CERT_DIR",
    required=True,
    help="Where to keep svid.pem, svid_key.pem and svid_bundle.pem (env SHOAL_CERT_DIR).",
)
@log_level_option()
def identity_agent(
    identity_server: str | None,
    trust_bundle: Path | None,
    token_file: Path | None,
    service: str | None,
    out: Path,
    log_level: str | None,
) -> None:
    """Keep this workload's mesh certificate in files, renewed until stopped.

    For programs that read their certificate from disk, such as proxyless gRPC
    clients (see `shoal xds-bootstrap --cert-dir`).
    """
    setup_logging(log_level)
    mesh = mesh_identity(identity_server, trust_bundle, token_file)
    if mesh is None:
        raise UserError(
            "identity-agent needs --identity-server, --trust-bundle and a token "
            "(SHOAL_TOKEN or --token-file)"
        )
    try:
        expected = None if service is None else SpiffeId.service(mesh.trust_domain, service)
    except SpiffeError as exc:
        raise UserError(f"--service: {exc}") from None
    agent = IdentityAgent(mesh, CertFiles(out), expected)

    def ready() -> None:
        held = agent.current()
        click.echo(f"shoal identity-agent keeping {held.identity} in {out}", nl=True)

    try:
        asyncio.run(serve(agent, grace=1.0, on_started=ready))
    except OSError as exc:
        raise UserError(f"--out {out}: {exc.strerror or exc}") from None
