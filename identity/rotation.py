"""Rotating a mesh's root with no failed call: add the new root, switch, drop the old.

A workload trusts the bundle it got with its last leaf, so the new root must reach every
workload before any leaf it signs does, and the old root must stay until no leaf it
signed is left. Hence three steps on the CA directory, each at least one leaf lifetime
after the one before (every workload renews within one):

1. ``begin``: make the next root and issuer in ``next/``; the bundle holds both roots.
   The identity server serves that bundle with each leaf; leaves are still the old
   issuer's.
2. ``switch``: the next root and issuer become the CA's; the old issuer's certificate
   moves to ``previous/`` (its keys are deleted), so leaves it signed may still renew
   (into new leaves). Both roots
   stay trusted.
3. ``finish``: the bundle holds the new root alone; ``previous/`` goes.

The identity server picks each step up by itself (``Certifier`` reloads the directory
when it changes). Keys keep their 0600 mode: they are moved, never rewritten.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from identity.ca import CAError, init_ca, load_ca

__all__ = ["begin", "finish", "switch"]

_KEYS = ("root.crt", "root.key", "issuer.crt", "issuer.key")


def _write_bundle(directory: Path, pem: bytes) -> None:
    # Written aside then renamed: a reader sees the old bundle or the new, never half.
    staged = directory / "bundle.crt.new"
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.replace(staged, directory / "bundle.crt")


def begin(directory: Path) -> None:
    """Step 1: a next root, trusted beside the current one."""
    ca = load_ca(directory)
    if (directory / "next").exists():
        raise CAError(f"{directory} is rotating already: switch, then finish")
    if ca.previous:
        raise CAError(f"{directory} has not finished its last rotation: finish it first")
    nxt = init_ca(directory / "next", ca.trust_domain)
    _write_bundle(directory, ca.bundle_pem.rstrip(b"\n") + b"\n" + nxt.bundle_pem)


def switch(directory: Path) -> None:
    """Step 2: sign with the next issuer; the old one may still renew its leaves."""
    load_ca(directory)
    nxt = directory / "next"
    if not nxt.exists():
        raise CAError(f"{directory} is not rotating: begin first")
    previous = directory / "previous"
    previous.mkdir(mode=0o700)
    for name in _KEYS:
        if (directory / name).exists():  # the root's key may be kept elsewhere (offline)
            os.replace(directory / name, previous / name)
    # Retired keys sign nothing more: they go. The old issuer's certificate stays, to
    # check renewals of the leaves it signed.
    (previous / "root.key").unlink(missing_ok=True)
    (previous / "issuer.key").unlink()
    for name in _KEYS:
        os.replace(nxt / name, directory / name)
    shutil.rmtree(nxt)


def finish(directory: Path) -> None:
    """Step 3: trust the new root alone."""
    ca = load_ca(directory)
    if (directory / "next").exists():
        raise CAError(f"{directory} has not switched to its next root yet")
    if not ca.previous:
        raise CAError(f"{directory} is not rotating: nothing to finish")
    _write_bundle(directory, (directory / "root.crt").read_bytes())
    shutil.rmtree(directory / "previous")
