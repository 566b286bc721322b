"""``shoal xds-bootstrap``: the bootstrap file a plain gRPC client needs to find the
mesh's instances through the registry's xDS, with ``xds:///SERVICE`` targets.

gRPC reads the file named by ``GRPC_XDS_BOOTSTRAP`` once, when its first xDS channel
is made: it must be in the client's environment before then (before the process
starts, to be safe).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from identity.cert_files import CertFiles
from registry_service.errors import InvalidArgument
from registry_service.validation import check_service_name
from registry_service.xds.tls import CERTIFICATE_PROVIDER
from shoal_cli.errors import UserError
from shoal_cli.options import REGISTRIES
from shoal_core.files import write_atomic

__all__ = ["bootstrap_document", "xds_bootstrap"]

ENV_VAR = "GRPC_XDS_BOOTSTRAP"
DEFAULT_REFRESH = 60.0


def bootstrap_document(
    registries: Sequence[str],
    node_id: str,
    cluster: str,
    zone: str,
    certs: CertFiles | None = None,
    refresh: float = DEFAULT_REFRESH,
) -> dict[str, Any]:
    """The bootstrap gRPC's xDS client reads (gRFC A27), for the replicas of a registry
    at ``registries``: on plaintext, or with ``certs`` on mTLS to the registry and to
    every instance. gRPC reads the first, and one after it if that one cannot be reached
    (its xDS fallback, gRFC A71)."""
    node: dict[str, Any] = {"id": node_id}
    if cluster:
        node["cluster"] = cluster
    if zone:
        node["locality"] = {"zone": zone}
    # Plaintext, as a registry run with --insecure serves.
    creds: dict[str, Any] = {"type": "insecure"}
    document: dict[str, Any] = {"node": node}
    if certs is not None:
        files = {
            "certificate_file": str(certs.chain),
            "private_key_file": str(certs.key),
            "ca_certificate_file": str(certs.bundle),
            # gRPC re-reads the files this often (its default is 10 minutes).
            "refresh_interval": f"{refresh:g}s",
        }
        # The registry is checked by the host in server_uri (shoal registry --tls-name)...
        creds = {"type": "tls", "config": files}
        # ...and each instance by its SPIFFE ID, with the certificate of this provider
        # that every Cluster names (registry_service.xds.tls).
        document["certificate_providers"] = {
            CERTIFICATE_PROVIDER: {"plugin_name": "file_watcher", "config": files}
        }
    document["xds_servers"] = [
        {
            "server_uri": registry,
            "channel_creds": [creds],
            # Without it an older gRPC speaks xDS v2, which the registry does not serve.
            "server_features": ["xds_v3"],
        }
        for registry in registries
    ]
    return document


def _write(path: Path, text: str) -> None:
    # Whole or not at all: a client starting meanwhile must not read half a file.
    try:
        write_atomic(path, text.encode())
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _checked(field: str, value: str) -> str:
    if value:
        try:
            check_service_name(field, value)
        except InvalidArgument as exc:
            raise UserError(str(exc)) from None
    return value


@click.command("xds-bootstrap")
@click.option(
    "--registry",
    type=REGISTRIES,
    default="127.0.0.1:7700",
    show_default=True,
    envvar="SHOAL_REGISTRY",
    help="The registry whose xDS the client reads; several replicas of one, "
    "comma-separated: gRPC reads the first it can reach (env SHOAL_REGISTRY).",
)
@click.option(
    "--node-id",
    default="",
    help="The client's node id in the registry's logs (default: shoal-proxyless-HOSTNAME).",
)
@click.option("--cluster", default="", help="The client's own service, as node.cluster.")
@click.option("--zone", default="", help="The client's zone, as node.locality.zone.")
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SHOAL_CERT_DIR",
    default=None,
    help="For an mTLS mesh: the directory `shoal identity-agent --out` keeps the client's "
    "certificate in (env SHOAL_CERT_DIR).",
)
@click.option(
    "--cert-refresh",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_REFRESH,
    show_default=True,
    help="Seconds between gRPC's reads of the certificate files.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("xds-bootstrap.json"),
    show_default=True,
    help="Where to write the bootstrap file.",
)
def xds_bootstrap(
    registry: tuple[str, ...],
    node_id: str,
    cluster: str,
    zone: str,
    cert_dir: Path | None,
    cert_refresh: float,
    out: Path,
) -> None:
    """Write the xDS bootstrap file for plain gRPC clients of the mesh.

    A client then dials xds:///SERVICE, with GRPC_XDS_BOOTSTRAP naming the file; in an
    mTLS mesh (--cert-dir) with grpc.xds_channel_credentials.
    """
    node_id = node_id.strip() or f"shoal-proxyless-{socket.gethostname()}"
    if any(ch.isspace() or not ch.isprintable() for ch in node_id) or len(node_id) > 253:
        raise UserError("--node-id: must be at most 253 printable characters, no spaces")
    # The client may run elsewhere than here: it must find the files from any directory.
    certs = None if cert_dir is None else CertFiles(cert_dir.resolve())
    if certs is not None and not certs.chain.exists():
        # Not an error: the agent may be started after, but say what is missing.
        click.echo(f"note: no {certs.chain} yet; run shoal identity-agent --out {cert_dir}")
    document = bootstrap_document(
        registry,
        node_id,
        _checked("--cluster", cluster),
        _checked("--zone", zone),
        certs,
        cert_refresh,
    )
    _write(out, json.dumps(document, indent=2) + "\n")
    click.echo(f"wrote {out}; set {ENV_VAR}={out.resolve()} in the client's environment")
