"""Turning user mistakes into one clear line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from shoal_cli.output import mute
from shoal_core.addresses import AddressError
from shoal_core.errors import Isolated, ShoalUserError

__all__ = ["USER_ERROR", "Group", "ReaderGone", "UserError", "WorkFailed", "run_guarded"]

USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix: a bad value, an unreachable address, a broken file."""


class WorkFailed(Exception):
    """The work itself ran and failed (timed out, raised, crashed): exit 1, not 2."""


def _fail(message: str) -> int:
    click.echo(f"shoal: error: {message}", err=True)
    return USER_ERROR


class ReaderGone(Exception):
    """The reader of our output went away (``shoal ls | head``)."""


class Group(click.Group):
    """The ``shoal`` group: a broken pipe in a command reaches ``run_guarded``.

    click answers EPIPE itself, even when not standalone, with exit status 1.
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise ReaderGone() from None


def _reader_gone() -> int:
    """Output piped into something that stopped reading (``| head``): not an error, and
    nothing is left to say; muted, the final flush at exit cannot complain either."""
    mute(sys.stdout)
    mute(sys.stderr)
    return 0


def run_guarded(run: Callable[[], object]) -> int:
    """Run a click entry point in non-standalone mode and map its outcome to an exit status."""
    try:
        result = run()
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        return _fail(exc.format_message().replace("\n", " "))
    except (UserError, AddressError, ShoalUserError) as exc:
        return _fail(str(exc))
    except (WorkFailed, Isolated) as exc:
        click.echo(f"shoal: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except (BrokenPipeError, ReaderGone):
        return _reader_gone()
    return result if isinstance(result, int) else 0
