"""Click parameter types shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from shoal_core.addresses import AddressError, parse_address

__all__ = [
    "ADDRESS",
    "LISTEN",
    "F",
    "grace_option",
    "json_option",
    "log_level_option",
    "metrics_option",
]

# What click's option decorators take and return; naming it keeps commands typed.
F = TypeVar("F", bound=Callable[..., Any])


class _Address(click.ParamType[str]):
    name = "HOST:PORT"

    def __init__(self, *, listen: bool) -> None:
        self._listen = listen

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        text = str(value)
        try:
            parse_address(text, allow_port_zero=self._listen)
        except AddressError as exc:
            self.fail(str(exc), param, ctx)
        return text


ADDRESS = _Address(listen=False)
LISTEN = _Address(listen=True)


def grace_option(
    default: float, help: str = "Seconds to drain on SIGTERM/SIGINT before forcing."
) -> Callable[[F], F]:
    """``--grace``: how long a server drains on the first stop signal."""
    return click.option(
        "--grace", type=click.FloatRange(min=0.0), default=default, show_default=True, help=help
    )


def log_level_option() -> Callable[[F], F]:
    """``--log-level`` (``SHOAL_LOG_LEVEL`` applies when it is not given)."""
    return click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")


def metrics_option() -> Callable[[F], F]:
    """``--metrics``: serve Prometheus metrics over HTTP (parameter ``metrics_listen``)."""
    return click.option(
        "--metrics",
        "metrics_listen",
        type=LISTEN,
        default=None,
        help="Serve Prometheus metrics over HTTP on this address.",
    )


def isolation_option() -> Callable[[F], F]:
    """``--exit-when-isolated SECONDS`` (parameter ``exit_when_isolated``)."""
    return click.option(
        "--exit-when-isolated",
        "exit_when_isolated",
        type=click.FloatRange(min=1.0),
        default=None,
        metavar="SECONDS",
        help="Drain and exit (status 1) once nothing but loopback has been reachable "
        "this long, so a container restart policy brings the process back into a live "
        "network (for containers sharing a pod's network namespace).",
    )


def json_option() -> Callable[[F], F]:
    """``--json`` (parameter ``as_json``): one JSON object on stdout instead of text."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead."
    )
