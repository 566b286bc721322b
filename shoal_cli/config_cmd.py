"""``shoal config check``: validate a mesh file and point at each problem."""

from __future__ import annotations

from typing import Any

import click

from shoal_cli.errors import USER_ERROR
from shoal_cli.mesh.config import load_mesh_file
from shoal_cli.options import json_option
from shoal_cli.output import emit_json
from shoal_core.config import ConfigError

__all__ = ["config"]


@click.group()
def config() -> None:
    """Work with mesh files."""


def _problems(file: str, exc: ConfigError) -> list[dict[str, Any]]:
    """Each problem of ``exc`` as (file, line or None, message)."""
    found = []
    for problem in exc.problems:
        where, sep, rest = problem.partition(": ")
        line = where.removeprefix("line ")
        if sep and where.startswith("line ") and line.isdigit():
            found.append({"file": file, "line": int(line), "message": rest})
        else:
            found.append({"file": file, "line": None, "message": problem})
    return found


@config.command()
@click.argument("file", type=click.Path(dir_okay=False))
@json_option()
def check(file: str, as_json: bool) -> int:
    """Validate FILE and the worker and sidecar files it names.

    Prints FILE:LINE: field: problem for each error, and exits 2 if there is any.
    """
    problems: list[dict[str, Any]] = []
    sections: list[str] = []
    try:
        mesh = load_mesh_file(file)
    except ConfigError as exc:
        problems = _problems(file, exc)
    else:
        from proxy_sidecar.config import load_config as load_sidecar
        from worker_node.config import load_config as load_worker

        named = ((mesh.worker.config, load_worker), (mesh.sidecar.config, load_sidecar))
        for path, loader in named:
            if path is None:
                continue
            try:
                loader(path)
            except ConfigError as exc:
                problems += _problems(exc.source, exc)
        sections = [name for name, values in mesh.default_map().items() if values]
    if as_json:
        emit_json({"file": file, "ok": not problems, "sections": sections, "problems": problems})
    else:
        for p in problems:
            where = f"{p['file']}:{p['line']}" if p["line"] is not None else p["file"]
            click.echo(f"{where}: {p['message']}", err=True)
        if not problems:
            click.echo(f"{file}: ok ({', '.join(sections) or 'no sections set'})")
    return USER_ERROR if problems else 0
