"""``shoal registry``'s store: ``--store memory|etcd://...`` and TLS to etcd.

TLS to etcd is on when ``--etcd-ca`` is given: the gateway and lease renewals then
go over HTTPS and gRPC with TLS, checking etcd's certificate against that CA, and with
``--etcd-cert``/``--etcd-key`` the registry shows etcd a client certificate (for etcd
run with ``--client-cert-auth``). Without it the traffic is plaintext, which the
registry says in a warning, as it does for its own plaintext listener.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from registry_service.etcd import EtcdTls
from shoal_cli.errors import UserError
from shoal_core.addresses import AddressError
from shoal_core.replicas import parse_registries

__all__ = ["EtcdStore", "parse_store", "store_options"]

F = TypeVar("F", bound=Callable[..., Any])

_PEM = click.Path(exists=True, dir_okay=False, path_type=Path)


@dataclass(frozen=True, slots=True)
class EtcdStore:
    """Where an etcd-backed registry keeps its state, and how it reaches it."""

    endpoints: tuple[str, ...]
    tls: EtcdTls | None


def store_options() -> Callable[[F], F]:
    def decorate(f: F) -> F:
        for option in reversed(
            [
                click.option(
                    "--store",
                    default="memory",
                    show_default=True,
                    metavar="memory|etcd://HOST:PORT,...",
                    help="Where the instances live: in this process, or in an etcd cluster "
                    "that any number of registry replicas share.",
                ),
                click.option(
                    "--etcd-ca",
                    type=_PEM,
                    envvar="SHOAL_ETCD_CA",
                    help="TLS to etcd: the CA (PEM) that signed etcd's certificates.",
                ),
                click.option(
                    "--etcd-cert",
                    type=_PEM,
                    envvar="SHOAL_ETCD_CERT",
                    help="The registry's client certificate (PEM) for etcd; needs --etcd-key.",
                ),
                click.option(
                    "--etcd-key",
                    type=_PEM,
                    envvar="SHOAL_ETCD_KEY",
                    help="The key (PEM) of --etcd-cert.",
                ),
            ]
        ):
            f = option(f)
        return f

    return decorate


def parse_store(
    store: str, ca: Path | None, cert: Path | None, key: Path | None
) -> EtcdStore | None:
    """None for ``memory``, else the etcd store; a bad value is a ``UserError``."""
    if store == "memory":
        if ca or cert or key:
            raise UserError("--etcd-ca, --etcd-cert and --etcd-key need --store etcd://...")
        return None
    scheme, _, rest = store.partition("://")
    if scheme != "etcd" or not rest:
        raise UserError(f"--store must be memory or etcd://HOST:PORT[,HOST:PORT...], not {store!r}")
    try:
        endpoints = parse_registries(rest)
    except AddressError as exc:
        raise UserError(f"--store {store}: {exc}") from None
    if ca is None:
        if cert or key:
            raise UserError("--etcd-cert and --etcd-key need --etcd-ca (TLS to etcd)")
        return EtcdStore(endpoints, None)
    try:
        tls = EtcdTls(ca, cert, key)
        tls.check()
    except ValueError as exc:
        raise UserError(f"--etcd-ca/--etcd-cert/--etcd-key: {exc}") from None
    return EtcdStore(endpoints, tls)
