"""Fixtures shared by every test package: real servers on 127.0.0.1:0, and leak checks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must reap what it started: no child process may outlive it.

    Processes under one that was already running when the test began belong to a
    longer-lived fixture (a module's mesh, say), which checks its own at teardown.
    """
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = []
    for proc in me.children(recursive=True):
        try:
            if proc.pid in before or any(a.pid in before for a in proc.parents()):
                continue
            # A child that exited but is not yet reaped is still a leak (a zombie).
            leftover.append(f"{proc.pid} {proc.name()} {proc.status()}")
        except psutil.NoSuchProcess:
            continue
    assert not leftover, f"child processes left behind: {leftover}"
