"""Click parameter types shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from shoal_core.addresses import AddressError, parse_address
from shoal_core.replicas import parse_registries
from shoal_core.tracing import DEFAULT_SAMPLE, TraceSettings

__all__ = [
    "ADDRESS",
    "LISTEN",
    "REGISTRIES",
    "F",
    "grace_option",
    "json_option",
    "log_level_option",
    "metrics_option",
    "trace_options",
    "trace_settings",
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


class _Registries(click.ParamType[tuple[str, ...]]):
    """``host:port[,host:port...]``: the replicas of one registry, tried in turn."""

    name = "HOST:PORT[,...]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):  # a default already converted, or a caller's tuple
            value = ",".join(value)
        try:
            return parse_registries(str(value))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)


REGISTRIES = _Registries()


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


def trace_options() -> Callable[[F], F]:
    """``--otlp-endpoint`` and ``--trace-sample`` (``SHOAL_OTLP_ENDPOINT``,
    ``SHOAL_TRACE_SAMPLE``, shared by every command that traces); the command turns them
    into ``TraceSettings`` with ``trace_settings``."""

    def wrap(command: F) -> F:
        command = click.option(
            "--trace-sample",
            type=click.FloatRange(0.0, 1.0),
            envvar="SHOAL_TRACE_SAMPLE",
            default=DEFAULT_SAMPLE,
            show_default=True,
            help="Share of the traces started here that are kept (a call that arrives "
            "with a trace keeps its caller's choice).",
        )(command)
        return click.option(
            "--otlp-endpoint",
            envvar="SHOAL_OTLP_ENDPOINT",
            default=None,
            metavar="URL",
            help="Send spans to this OTLP/gRPC collector (http://HOST:4317); no tracing without.",
        )(command)

    return wrap


def trace_settings(endpoint: str | None, sample: float, service: str) -> TraceSettings | None:
    """What ``trace_options`` gave, for a process calling itself ``service``; ``None``
    when tracing is off. A malformed endpoint is a user error."""
    if not endpoint:
        return None
    try:
        return TraceSettings(endpoint=endpoint, service=service, sample=sample)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--otlp-endpoint") from None
