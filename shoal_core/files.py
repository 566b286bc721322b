"""Writing a file whole or not at all.

Readers of the files we write (a gRPC client reading its bootstrap or certificate
files, etcd reading its key, the CLI reading an operator record) may read at any
moment: they must see the old file or the new one, never half of one. So we write a
temporary file beside it and rename it over the old one, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``, with ``mode`` from the first byte on (a key is
    never readable by others, not even for a moment); ``OSError`` if it cannot."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
