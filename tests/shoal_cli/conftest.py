"""CLI fixtures: `shoal` run as a user runs it, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


@pytest.fixture
def registry_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "SHOAL_REGISTRY_LISTEN": "127.0.0.1:0", "SHOAL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [*SHOAL, "registry", "--sweep-interval", "0.2", "--grace", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal registry serving on "), (
            line,
            proc.stderr.read() if proc.stderr else "",
        )
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
