"""Entry point of the ``shoal`` console script.

Every option can also come from an environment variable named
``SHOAL_<COMMAND>_<OPTION>`` (for example ``SHOAL_REGISTRY_LISTEN``); a flag on
the command line wins over the environment. User mistakes print one line and
exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import os
import sys

# gRPC core prints its own copy of errors we already report in one clear line; a user
# who wants its logs can still set GRPC_VERBOSITY. Must happen before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import importlib  # noqa: E402

import click  # noqa: E402

from shoal_cli.errors import Group, run_guarded  # noqa: E402

__all__ = ["cli", "main"]

# Each command is imported only when it runs: `shoal health`, run by container health
# checks every few seconds, must not pay for the registry, the sidecar and rich.
_COMMANDS = {
    "bench": "shoal_cli.bench_cmd:bench",
    "ca": "shoal_cli.identity_cmd:ca",
    "call": "shoal_cli.worker_ops:call",
    "config": "shoal_cli.config_cmd:config",
    "dashboard": "shoal_cli.dashboard_cmd:dashboard",
    "etcd-cert": "shoal_cli.etcd_cert_cmd:etcd_cert",
    "exec": "shoal_cli.worker_ops:exec_",
    "health": "shoal_cli.probe_cmd:health",
    "identity": "shoal_cli.identity_cmd:identity",
    "identity-agent": "shoal_cli.agent_cmd:identity_agent",
    "ls": "shoal_cli.registry_ops:ls",
    "policy": "shoal_cli.policy_cmd:policy",
    "registry": "shoal_cli.registry_cmd:registry",
    "registry-demo": "shoal_cli.registry_cmd:registry_demo",
    "sidecar": "shoal_cli.sidecar_cmd:sidecar",
    "stats": "shoal_cli.stats_cmd:stats",
    "token": "shoal_cli.identity_cmd:token",
    "up": "shoal_cli.up_cmd:up",
    "watch": "shoal_cli.registry_ops:watch",
    "worker": "shoal_cli.worker_cmd:worker",
    "xds-bootstrap": "shoal_cli.xds_cmd:xds_bootstrap",
}


class _Commands(Group):
    """The ``shoal`` group, loading each command's module when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal")
def cli() -> None:
    """Shoal: a service mesh for Python on gRPC."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    return run_guarded(
        lambda: cli.main(
            args=argv, prog_name="shoal", auto_envvar_prefix="SHOAL", standalone_mode=False
        )
    )


if __name__ == "__main__":
    sys.exit(main())
