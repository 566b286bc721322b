"""Turning user mistakes into one clear line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from shoal_cli.output import mute
from shoal_core.addresses import AddressError
from shoal_core.config import ConfigError
from shoal_core.grpc_server import ServerStartError

__all__ = ["USER_ERROR", "UserError", "WorkFailed", "run_guarded"]

USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix: a bad value, an unreachable address, a broken file."""


class WorkFailed(Exception):
    """The work itself ran and failed (timed out, raised, crashed): exit 1, not 2."""


def _fail(message: str) -> int:
    click.echo(f"shoal: error: {message}", err=True)
    return USER_ERROR


def run_guarded(run: Callable[[], object]) -> int:
    """Run a click entry point in non-standalone mode and map its outcome to an exit status."""
    try:
        result = run()
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        return _fail(exc.format_message().replace("\n", " "))
    except (UserError, AddressError, ConfigError, ServerStartError) as exc:
        return _fail(str(exc))
    except WorkFailed as exc:
        click.echo(f"shoal: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into something that stopped reading (e.g. `| head`): not an error,
        # and nothing is left to say; muted, the final flush at exit cannot complain.
        mute(sys.stdout)
        mute(sys.stderr)
        return 0
    return result if isinstance(result, int) else 0
