"""Functions the tests run in pool processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def pid(payload: bytes) -> bytes:
    return str(os.getpid()).encode()


def spawn_and_hang(payload: bytes) -> bytes:
    """Start a grandchild, write its pid to the file named in the payload, then hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(payload.decode()).write_text(str(child.pid))
    time.sleep(60)
    return b""


def exit_clean(payload: bytes) -> bytes:
    os._exit(0)


def terminate_self(payload: bytes) -> bytes:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    return b""


def wrong_type(payload: bytes) -> bytes:
    return 42  # type: ignore[return-value]


def big(payload: bytes) -> bytes:
    return b"x" * int(payload.decode())


def slow_upper(payload: bytes) -> bytes:
    time.sleep(0.3)
    return payload.upper()
