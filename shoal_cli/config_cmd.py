"""``shoal config check``: validate a mesh file and point at each problem."""

from __future__ import annotations

import click

from shoal_cli.errors import USER_ERROR
from shoal_cli.mesh.config import load_mesh_file
from shoal_core.config import ConfigError

__all__ = ["config"]


@click.group()
def config() -> None:
    """Work with mesh files."""


def _report(file: str, exc: ConfigError) -> None:
    for problem in exc.problems:
        where, sep, rest = problem.partition(": ")
        line = where.removeprefix("line ") if sep and where.startswith("line ") else ""
        click.echo(f"{file}:{line}: {rest}" if line else f"{file}: {problem}", err=True)


@config.command()
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> int:
    """Validate FILE and the worker and sidecar files it names.

    Prints FILE:LINE: field: problem for each error, and exits 2 if there is any.
    """
    try:
        mesh = load_mesh_file(file)
    except ConfigError as exc:
        _report(file, exc)
        return USER_ERROR
    from proxy_sidecar.config import load_config as load_sidecar
    from worker_node.config import load_config as load_worker

    ok = True
    for named, loader in ((mesh.worker.config, load_worker), (mesh.sidecar.config, load_sidecar)):
        if named is None:
            continue
        try:
            loader(named)
        except ConfigError as exc:
            _report(exc.source, exc)
            ok = False
    if not ok:
        return USER_ERROR
    sections = [name for name, values in mesh.default_map().items() if values]
    click.echo(f"{file}: ok ({', '.join(sections) or 'no sections set'})")
    return 0
