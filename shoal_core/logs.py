"""One logging setup for every Shoal process, so their lines look and filter alike."""

from __future__ import annotations

import logging
import os
import re

__all__ = ["quiet_vanished_clients", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_GRPC_LOGGER = "grpc._cython.cygrpc"

logger = logging.getLogger("shoal_core.grpc_server")


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``SHOAL_LOG_LEVEL`` applies when no level is given."""
    chosen = (level or os.environ.get("SHOAL_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(f"log level {chosen!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=chosen, format=_FORMAT, force=True)
    # grpc's own asyncio logger is chatty at INFO about things we already report.
    logging.getLogger(_GRPC_LOGGER).setLevel(logging.WARNING)
    quiet_vanished_clients()


# grpc.aio logs these with a traceback when a reply cannot be sent because the client's
# stream is gone (reset, or its connection closed) before grpc noticed the client left.
_VANISHED = re.compile(
    r"^(?:ExecuteBatchError raised in core by servicer method \[(?P<method>[^\]]*)\]"
    r"|Failed sending error status from server)$"
)


class _VanishedClientFilter(logging.Filter):
    """Turns grpc's ERROR-with-traceback for a client that went away into one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _VANISHED.match(record.getMessage())
        if found is None:
            return True
        logger.debug("client went away before %s was answered", found["method"] or "a call")
        return False


_FILTER = _VanishedClientFilter()


def quiet_vanished_clients() -> None:
    """Install the filter on grpc's logger (once); every gRPC server calls this."""
    grpc_logger = logging.getLogger(_GRPC_LOGGER)
    if _FILTER not in grpc_logger.filters:
        grpc_logger.addFilter(_FILTER)
