"""Click parameter types shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from shoal_core.addresses import AddressError, parse_address

__all__ = ["ADDRESS", "LISTEN", "F"]

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
