"""Keeping a workload's certificate fresh: certify once, then renew before it expires.

The keeper asks for its first leaf (with the join token) when it starts, then renews at
about 70 % of the life left (``identity.workload.renew_after``). A renewal that fails
is logged and retried with the one backoff; the leaf held keeps serving until it
expires, so an identity server that is down for less than the remaining 30 % costs
nothing; once it has expired the keeper asks with the join token again (if that is
still good, the workload recovers by itself when the identity server is back). Whoever
uses the credentials reads ``current()`` when it opens a connection (or is told through
``on_change``), so new connections get the new leaf and open ones keep theirs.

How a request travels is the caller's: ``certify(held)`` gets new credentials, by token
when ``held`` is None and by renewal otherwise (grpcio for the CLI and the registry, the
data plane's own calls for the sidecar).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from identity.workload import Credentials, renew_after
from shoal_core.backoff import Attempts, Backoff
from shoal_core.lifecycle import stop_task

__all__ = ["CertificateKeeper", "Certify"]

logger = logging.getLogger(__name__)

Certify = Callable[[Credentials | None], Awaitable[Credentials]]
RETRY = Backoff(initial=0.5, maximum=30.0)


class CertificateKeeper:
    """Holds credentials from ``certify`` and renews them until ``close()``."""

    def __init__(
        self,
        certify: Certify,
        *,
        on_change: Callable[[Credentials], None] | None = None,
        retry: Backoff = RETRY,
    ) -> None:
        self._certify = certify
        self._on_change = on_change
        self._retry = retry
        self._held: Credentials | None = None
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0
        self.failures = 0

    def current(self) -> Credentials:
        if self._held is None:
            raise RuntimeError("the certificate keeper has not started")
        return self._held

    async def start(self) -> Credentials:
        """The first certificate (errors are the caller's: a bad token is not retried)."""
        self._take(await self._certify(None))
        self._task = asyncio.create_task(self._renew_forever(), name="certificate-renewal")
        return self.current()

    def _take(self, fresh: Credentials) -> None:
        self._held = fresh
        if self._on_change is not None:
            self._on_change(fresh)

    async def _renew_forever(self) -> None:
        attempts = Attempts(self._retry)
        pause = renew_after(self.current().leaf)
        while True:
            await asyncio.sleep(pause)
            held = self.current()
            # A leaf that expired (the identity server was away longer than its life)
            # proves nothing any more: ask again with the join token, as at the start.
            expired = held.leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC)
            try:
                fresh = await self._certify(None if expired else held)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: keep the leaf held, try again
                self.failures += 1
                left = (held.leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
                pause = attempts.failed()
                log = logger.warning if left > 0 else logger.error
                log(
                    "renewing %s failed (%s); %s; retrying in %.1fs",
                    held.identity,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    f"the current certificate serves {left:.0f}s more"
                    if left > 0
                    else "the current certificate has EXPIRED",
                    pause,
                )
                continue
            attempts.succeeded()
            self.renewals += 1
            self._take(fresh)
            pause = renew_after(fresh.leaf)
            logger.info("renewed %s; next renewal in %.0fs", fresh.identity, pause)

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
