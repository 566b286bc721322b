"""One logging setup for every Shoal process, so their lines look and filter alike."""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``SHOAL_LOG_LEVEL`` applies when no level is given."""
    chosen = (level or os.environ.get("SHOAL_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(f"log level {chosen!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=chosen, format=_FORMAT, force=True)
    # grpc's own asyncio logger is chatty at INFO about things we already report.
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.WARNING)
