"""``shoal etcd-cert``: certificates for an etcd cluster and the registries that use it.

    shoal etcd-cert --ca-dir CA --out DIR --member etcd1 [--dns etcd1 ...]   # a member
    shoal etcd-cert --ca-dir CA --out DIR --client registry                   # a client

The CA in ``--ca-dir`` is made on first use and kept; each call issues one pair into
``--out`` beside a copy of the CA certificate, which is what etcd's ``--cert-file``,
``--key-file`` and ``--trusted-ca-file`` (and ``shoal registry --etcd-ca/--etcd-cert/
--etcd-key``) take. See ``identity.etcd_pki`` for what each certificate holds.
"""

from __future__ import annotations

from pathlib import Path

import click

from identity.etcd_pki import load_or_init
from shoal_cli.errors import UserError

__all__ = ["etcd_cert"]

_DIR = click.Path(file_okay=False, path_type=Path)


@click.command("etcd-cert")
@click.option("--ca-dir", type=_DIR, required=True, help="The etcd CA's directory (made once).")
@click.option("--out", type=_DIR, required=True, help="Where the pair and ca.pem go.")
@click.option("--member", help="Issue for this etcd member (its name, a DNS name too).")
@click.option("--dns", multiple=True, help="More DNS names for --member (repeat).")
@click.option("--client", help="Issue a client certificate with this common name.")
@click.option(
    "--group-readable",
    is_flag=True,
    help="Key mode 0640, for a process of another user in the writer's group (etcd's own).",
)
def etcd_cert(
    ca_dir: Path,
    out: Path,
    member: str | None,
    dns: tuple[str, ...],
    client: str | None,
    group_readable: bool,
) -> None:
    """Issue an etcd member's or client's certificate from a CA of the cluster's own."""
    if (member is None) == (client is None):
        raise UserError("give exactly one of --member NAME or --client NAME")
    if dns and member is None:
        raise UserError("--dns names a member's addresses; it needs --member")
    try:
        ca = load_or_init(ca_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"--ca-dir {ca_dir}: {exc}") from None
    mode = 0o640 if group_readable else 0o600
    if member is not None:
        pair = ca.write_pair(out, member, server_names=(member, *dns), key_mode=mode)
    else:
        assert client is not None
        pair = ca.write_pair(out, client, key_mode=mode)
    click.echo(f"etcd-cert: {pair.cert} and {pair.key}, CA {out / 'ca.pem'}")
