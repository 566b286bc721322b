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

import click  # noqa: E402

from shoal_cli.bench_cmd import bench  # noqa: E402
from shoal_cli.config_cmd import config  # noqa: E402
from shoal_cli.errors import Group, run_guarded  # noqa: E402
from shoal_cli.probe_cmd import health  # noqa: E402
from shoal_cli.registry_cmd import registry, registry_demo  # noqa: E402
from shoal_cli.registry_ops import ls, watch  # noqa: E402
from shoal_cli.sidecar_cmd import sidecar  # noqa: E402
from shoal_cli.stats_cmd import stats  # noqa: E402
from shoal_cli.up_cmd import up  # noqa: E402
from shoal_cli.worker_cmd import worker  # noqa: E402
from shoal_cli.worker_ops import call, exec_  # noqa: E402

__all__ = ["cli", "main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal")
def cli() -> None:
    """Shoal: a service mesh for Python on gRPC."""


cli.add_command(registry)
cli.add_command(registry_demo)
cli.add_command(health)
cli.add_command(config)
cli.add_command(up)
cli.add_command(exec_)
cli.add_command(call)
cli.add_command(stats)
cli.add_command(bench)
cli.add_command(ls)
cli.add_command(watch)
cli.add_command(worker)
cli.add_command(sidecar)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    return run_guarded(
        lambda: cli.main(
            args=argv, prog_name="shoal", auto_envvar_prefix="SHOAL", standalone_mode=False
        )
    )


if __name__ == "__main__":
    sys.exit(main())
