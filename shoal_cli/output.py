"""Writing output that survives its reader going away, and JSON on request.

Output whose reader went away (``shoal up | tee`` and the ``tee`` died with the same
Ctrl-C, a closed terminal) must never stop what the command is doing: ``say``,
``quiet_if_gone`` and the consoles of ``shoal_cli.render`` point such a stream at
/dev/null and carry on, so every later write to it, ours or a library's, succeeds
and goes nowhere. Nothing heavy is imported here: every command loads this module,
container health probes included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

import click

__all__ = ["emit_json", "is_terminal", "mute", "quiet_if_gone", "say"]

# A pipe without a reader (EPIPE), a terminal that is gone (EIO), a closed stream (EBADF).
_GONE = {errno.EPIPE, errno.EIO, errno.EBADF}


def is_terminal() -> bool:
    return sys.stdout.isatty()


def mute(stream: IO[str]) -> None:
    """Point ``stream``'s file descriptor at /dev/null: its reader is gone for good."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


@contextlib.contextmanager
def quiet_if_gone(stream: IO[str]) -> Iterator[None]:
    """Writes to ``stream`` inside; if its reader is gone, mute it instead of failing."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        mute(stream)


def say(message: str = "", *, err: bool = False) -> None:
    """``click.echo`` that never fails because nobody reads the stream any more."""
    stream = sys.stderr if err else sys.stdout
    with quiet_if_gone(stream):
        click.echo(message, file=stream)


def emit_json(value: Any) -> None:
    say(json.dumps(value, indent=2, sort_keys=True, default=str))
