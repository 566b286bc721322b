"""The mesh's authorization policy as the registry holds it, and its watchers.

One policy for the whole mesh, replaced whole by each ``set``: every change gets a
new version and is handed to every watcher. A watcher holds at most one pending
policy, the newest: each message is the whole policy, so one that was overtaken
before it was sent need never be sent (latest wins, and memory per watcher is one
reference however slow its reader). Versions are the wall-clock microsecond of the
change, or one more than the last if the clock has not moved on, so a restarted
registry does not reuse a version: a sidecar resuming with the version it holds is
sent nothing only if it really holds the current policy.

Given a file to keep it in (``shoal registry --state-dir``), the store reads the policy
from it at start and rewrites it (whole, then renamed) at each change: a restarted
registry must not fall back to allowing everything, which every sidecar would follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from identity.authz import Policy, load_policy

__all__ = ["PolicyStore", "PolicyWatcher"]

logger = logging.getLogger(__name__)


def _wall_microseconds() -> int:
    return time.time_ns() // 1000


class PolicyWatcher:
    """One stream's view: the newest policy it has not been given yet, if any."""

    def __init__(self) -> None:
        self._pending: tuple[int, Policy] | None = None
        self._wake = asyncio.Event()
        self.closed = False

    def offer(self, version: int, policy: Policy) -> None:
        self._pending = (version, policy)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self) -> tuple[int, Policy] | None:
        """The next policy to send; None once the watcher is closed."""
        while not self.closed:
            pending, self._pending = self._pending, None
            if pending is not None:
                return pending
            self._wake.clear()
            await self._wake.wait()
        return None


class PolicyStore:
    """The current policy and its version; ``watch`` gives each change to a watcher."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        clock: Callable[[], int] = _wall_microseconds,
        keep: Path | None = None,
    ) -> None:
        """``policy`` until one is set; with ``keep``, the one kept there wins (the
        newest an operator set), and each change is written there."""
        self._clock = clock
        self._keep = keep
        if keep is not None and keep.exists():
            policy = load_policy(keep)  # ConfigError, one line, if it was tampered with
            logger.info("authorization policy from %s: %d rules", keep, len(policy.rules))
        self._policy = policy or Policy()
        self._version = clock()
        self._watchers: set[PolicyWatcher] = set()
        self.closed = False

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def version(self) -> int:
        return self._version

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def set(self, policy: Policy) -> int:
        """Replace the policy (kept first, if kept: a change that cannot be kept is not
        made, and ``OSError`` says why); its new version."""
        if self._keep is not None:
            self._write(policy)
        self._version = max(self._version + 1, self._clock())
        self._policy = policy
        for watcher in self._watchers:
            watcher.offer(self._version, policy)
        return self._version

    def _write(self, policy: Policy) -> None:
        assert self._keep is not None
        staged = self._keep.with_name(self._keep.name + ".new")
        text = yaml.safe_dump(policy.to_data(), sort_keys=False)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staged, self._keep)

    def watch(self, known_version: int = 0) -> PolicyWatcher:
        """A watcher that is first offered the current policy, unless it holds
        ``known_version`` already; ``release`` it when its stream ends."""
        watcher = PolicyWatcher()
        if self.closed:
            watcher.close()
            return watcher
        if known_version != self._version:
            watcher.offer(self._version, self._policy)
        self._watchers.add(watcher)
        return watcher

    def release(self, watcher: PolicyWatcher) -> None:
        self._watchers.discard(watcher)

    def close_all(self) -> None:
        """End every watch: on shutdown, so streams finish instead of being cut."""
        self.closed = True
        for watcher in self._watchers:
            watcher.close()
