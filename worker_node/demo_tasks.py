"""Demo functions for the default config and the examples: bytes in, bytes out.

They run in pool processes, so ``crash`` really ends its process: that is how
the restart policies are shown and tested.
"""

from __future__ import annotations

import hashlib
import os
import time

__all__ = ["crash", "echo", "noop", "sha256", "sleep", "upper"]


def noop(payload: bytes) -> bytes:
    return b""


def echo(payload: bytes) -> bytes:
    return payload


def upper(payload: bytes) -> bytes:
    return payload.upper()


def sleep(payload: bytes) -> bytes:
    """Sleep for the number of seconds in the payload (ASCII, e.g. b"0.5"), capped at 1 hour."""
    seconds = float(payload.decode("ascii") or "0")
    if not 0 <= seconds <= 3600:
        raise ValueError(f"sleep takes 0..3600 seconds, got {seconds}")
    time.sleep(seconds)
    return payload


def crash(payload: bytes) -> bytes:
    """End this process at once: with the exit code in the payload, or by SIGKILL-like abort."""
    code = int(payload.decode("ascii") or "1")
    os._exit(code)


def sha256(payload: bytes) -> bytes:
    return hashlib.sha256(payload).hexdigest().encode("ascii")
