"""``shoal ca init``, ``shoal token create`` and ``shoal identity``: a mesh's CA, its join
tokens, and the server that certifies workloads."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path

import click

from identity import rotation
from identity.ca import CAError, init_ca, load_ca
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId
from identity.tokens import TokenError, create_token
from shoal_cli.errors import Group, UserError
from shoal_cli.options import LISTEN, grace_option, log_level_option, metrics_option
from shoal_core.lifecycle import serve
from shoal_core.logs import setup_logging

__all__ = ["ca", "identity", "token"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Duration(click.ParamType[dt.timedelta]):
    """A lifetime such as ``90s``, ``30m``, ``1h`` or ``365d``."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        match = re.fullmatch(r"(\d+)([smhd])", str(value).strip())
        if match is None or int(match.group(1)) == 0:
            self.fail(f"{value!r} is not a duration like 90s, 30m, 1h or 365d", param, ctx)
        return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


DURATION = _Duration()
_CA_DIR = click.Path(file_okay=False, path_type=Path)


@click.group(cls=Group)
def ca() -> None:
    """The mesh's certificate authority."""


@ca.command("init")
@click.argument("directory", type=_CA_DIR)
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--ttl", type=DURATION, default="365d", show_default=True, help="The root's life.")
def ca_init(directory: Path, trust_domain: str, ttl: dt.timedelta) -> None:
    """Make a root and an issuing key in DIRECTORY (keys 0600, never printed)."""
    try:
        made = init_ca(directory, trust_domain, ttl)
    except (CAError, SpiffeError) as exc:
        raise UserError(str(exc)) from None
    click.echo(
        f"CA for trust domain {made.trust_domain} in {directory}: trust bundle "
        f"{directory / 'bundle.crt'}, root valid until {made.root.not_valid_after_utc:%Y-%m-%d}"
    )


@ca.command("rotate")
@click.argument("directory", type=_CA_DIR)
@click.option("--begin", "step", flag_value="begin", help="Trust a next root beside this one.")
@click.option("--switch", "step", flag_value="switch", help="Sign with the next root's issuer.")
@click.option("--finish", "step", flag_value="finish", help="Trust the new root alone.")
def ca_rotate(directory: Path, step: str | None) -> None:
    """Rotate the root with no failed call: --begin, then --switch, then --finish, each at
    least one leaf lifetime after the one before (every workload renews within one)."""
    if step is None:
        raise UserError("say which step: --begin, --switch or --finish")
    try:
        {"begin": rotation.begin, "switch": rotation.switch, "finish": rotation.finish}[step](
            directory
        )
    except CAError as exc:
        raise UserError(str(exc)) from None
    said = {
        "begin": "a next root is trusted beside the current one; --switch after a leaf lifetime",
        "switch": "leaves are now signed by the new root's issuer; --finish after a leaf lifetime",
        "finish": "only the new root is trusted; mint new join tokens",
    }
    click.echo(f"{directory}: {said[step]}")


@click.group(cls=Group)
def token() -> None:
    """Join tokens: how a workload proves which service it is."""


@token.command("create")
@click.option("--ca", "ca_dir", type=_CA_DIR, required=True, help="The CA directory.")
@click.option("--service", help="The one service the token admits.")
@click.option("--registry", is_flag=True, help="Admit the registry instead of a service.")
@click.option("--operator", metavar="NAME", help="Admit an operator (shoal ls, policy ...).")
@click.option("--ttl", type=DURATION, default="1h", show_default=True)
def token_create(
    ca_dir: Path, service: str | None, registry: bool, operator: str | None, ttl: dt.timedelta
) -> None:
    """Print a token admitting SERVICE; give it as SHOAL_TOKEN or a file, not a flag."""
    if [service is not None, registry, operator is not None].count(True) != 1:
        raise UserError("give exactly one of --service NAME, --registry or --operator NAME")
    try:
        ca = load_ca(ca_dir)
        who: SpiffeId | str
        if registry:
            who = SpiffeId(ca.trust_domain, "registry")
        elif operator is not None:
            who = SpiffeId(ca.trust_domain, "operator", operator)
        else:
            who = service or ""
        text, claims = create_token(ca, who, ttl)
    except (CAError, TokenError, SpiffeError) as exc:
        raise UserError(str(exc)) from None
    click.echo(text)
    click.echo(f"admits {claims.identity} until {claims.expires:%Y-%m-%d %H:%M:%SZ}", err=True)


@click.command()
@click.option("--ca", "ca_dir", type=_CA_DIR, required=True, help="The CA directory.")
@click.option(
    "--listen",
    type=LISTEN,
    default="127.0.0.1:7710",
    show_default=True,
    help="Address for Certify (port 0 picks a free one).",
)
@click.option(
    "--leaf-ttl",
    type=DURATION,
    default="24h",
    show_default=True,
    help="Life of the certificates issued (seconds, for tests, down to 1s).",
)
@metrics_option()
@grace_option(2.0)
@log_level_option()
def identity(
    ca_dir: Path,
    listen: str,
    leaf_ttl: dt.timedelta,
    metrics_listen: str | None,
    grace: float,
    log_level: str | None,
) -> None:
    """Serve Certify: workloads trade a CSR and a join token for a certificate.

    Each step of `shoal ca rotate` on --ca is taken up as it is made, with no restart."""
    from identity_service.server import IdentityServer

    setup_logging(log_level)
    try:
        server = IdentityServer(
            listen,
            load_ca(ca_dir),
            leaf_ttl=leaf_ttl,
            metrics_listen=metrics_listen,
            ca_dir=ca_dir,
        )
    except CAError as exc:
        raise UserError(str(exc)) from None

    def ready() -> None:
        click.echo(
            f"shoal identity serving on {server.address} for {server.certifier.ca.trust_domain}"
        )

    asyncio.run(serve(server, grace=grace, on_started=ready))
