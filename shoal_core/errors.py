"""The errors every Shoal entry point reports to users in one line, in a module that
imports nothing heavy: the CLI catches them before it knows which command runs.

ShoalUserError
+-- ConfigError        a config file is missing, is not YAML, or does not validate
+-- ServerStartError   a server could not bind its listen address
+-- CertifyFailed      a workload got no certificate (refused, unreachable, wrong token)
Isolated               a server stopped itself: no network but loopback (exit 1)

``shoal_core.config`` and ``shoal_core.grpc_server`` raise them and re-export them.
"""

from __future__ import annotations

__all__ = ["CertifyFailed", "ConfigError", "Isolated", "ServerStartError", "ShoalUserError"]


class ShoalUserError(Exception):
    """Something the user can fix; ``str()`` is the one line to show."""


class ConfigError(ShoalUserError, ValueError):
    """A config file is missing, is not YAML, or does not validate; ``str()`` is for users."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class ServerStartError(ShoalUserError, RuntimeError):
    """The server could not bind its listen address."""


class CertifyFailed(ShoalUserError):
    """No certificate: the identity server refused, or could not be reached, or the token
    admits another identity than the process is; ``str()`` is the one line to show."""


class Isolated(Exception):
    """A server found only loopback for too long and stopped, so it can be restarted into a
    live network (``--exit-when-isolated``); not the user's mistake, so exit status 1."""
