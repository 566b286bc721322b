"""``shoal xds-bootstrap``: the bootstrap file a plain gRPC client needs to find the
mesh's instances through the registry's xDS, with ``xds:///SERVICE`` targets.

gRPC reads the file named by ``GRPC_XDS_BOOTSTRAP`` once, when its first xDS channel
is made: it must be in the client's environment before then (before the process
starts, to be safe).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import click

from registry_service.errors import InvalidArgument
from registry_service.validation import check_service_name
from shoal_cli.errors import UserError
from shoal_cli.options import ADDRESS

__all__ = ["bootstrap_document", "xds_bootstrap"]

ENV_VAR = "GRPC_XDS_BOOTSTRAP"


def bootstrap_document(registry: str, node_id: str, cluster: str, zone: str) -> dict[str, Any]:
    """The bootstrap gRPC's xDS client reads (gRFC A27), for a registry at ``registry``."""
    node: dict[str, Any] = {"id": node_id}
    if cluster:
        node["cluster"] = cluster
    if zone:
        node["locality"] = {"zone": zone}
    return {
        "xds_servers": [
            {
                "server_uri": registry,
                # Plaintext, as a registry run with --insecure serves: an mTLS registry
                # needs certificate-provider credentials here (phase 2).
                "channel_creds": [{"type": "insecure"}],
                # Without it an older gRPC speaks xDS v2, which the registry does not serve.
                "server_features": ["xds_v3"],
            }
        ],
        "node": node,
    }


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a client starting meanwhile must
    not read half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
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
    type=ADDRESS,
    default="127.0.0.1:7700",
    show_default=True,
    envvar="SHOAL_REGISTRY",
    help="The registry whose xDS the client reads (env SHOAL_REGISTRY).",
)
@click.option(
    "--node-id",
    default="",
    help="The client's node id in the registry's logs (default: shoal-proxyless-HOSTNAME).",
)
@click.option("--cluster", default="", help="The client's own service, as node.cluster.")
@click.option("--zone", default="", help="The client's zone, as node.locality.zone.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("xds-bootstrap.json"),
    show_default=True,
    help="Where to write the bootstrap file.",
)
def xds_bootstrap(registry: str, node_id: str, cluster: str, zone: str, out: Path) -> None:
    """Write the xDS bootstrap file for plain gRPC clients of the mesh.

    A client then dials xds:///SERVICE, with GRPC_XDS_BOOTSTRAP naming the file.
    """
    node_id = node_id.strip() or f"shoal-proxyless-{socket.gethostname()}"
    if any(ch.isspace() or not ch.isprintable() for ch in node_id) or len(node_id) > 253:
        raise UserError("--node-id: must be at most 253 printable characters, no spaces")
    document = bootstrap_document(
        registry, node_id, _checked("--cluster", cluster), _checked("--zone", zone)
    )
    _write(out, json.dumps(document, indent=2) + "\n")
    click.echo(f"wrote {out}; set {ENV_VAR}={out.resolve()} in the client's environment")
