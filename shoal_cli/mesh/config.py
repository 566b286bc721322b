"""The mesh file: one YAML file that can set every option of every part.

Each section is named after a command and its keys are that command's option
names with underscores (``registry: {ttl_default: 5}`` sets ``shoal registry
--ttl-default``). It becomes click's ``default_map``, which gives exactly the
documented precedence: flag > environment (``SHOAL_*``) > file > built-in default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import click
from pydantic import AfterValidator, Field

from shoal_cli.options import F
from shoal_core.addresses import parse_address
from shoal_core.config import StrictModel, load_yaml

__all__ = ["MeshFile", "config_option", "load_mesh_file"]


def _address(value: str) -> str:
    parse_address(value)
    return value


def _listen(value: str) -> str:
    parse_address(value, allow_port_zero=True)
    return value


Address = Annotated[str, AfterValidator(_address)]
Listen = Annotated[str, AfterValidator(_listen)]
Seconds = Annotated[float, Field(gt=0)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class RegistrySection(StrictModel):
    """Options of ``shoal registry``."""

    listen: Listen | None = None
    metrics: Listen | None = None
    ttl_default: Seconds | None = None
    ttl_min: Seconds | None = None
    ttl_max: Seconds | None = None
    sweep_interval: Seconds | None = None
    removal_grace: Annotated[float, Field(ge=0)] | None = None
    preservation_share: Annotated[float, Field(gt=0, le=1)] | None = None
    preservation_window: Seconds | None = None
    preservation_max: Seconds | None = None
    max_instances: Annotated[int, Field(ge=1)] | None = None
    max_instances_per_service: Annotated[int, Field(ge=1)] | None = None
    max_instances_bytes: Annotated[int, Field(ge=64 * 1024)] | None = None
    history_bytes: Annotated[int, Field(ge=64 * 1024)] | None = None
    grace: Annotated[float, Field(ge=0)] | None = None
    log_level: LogLevel | None = None


class WorkerSection(StrictModel):
    """Options of ``shoal worker`` (each worker of ``shoal up`` gets them)."""

    config: str | None = None
    grace: Annotated[float, Field(ge=0)] | None = None
    log_level: LogLevel | None = None


class SidecarSection(StrictModel):
    """Options of ``shoal sidecar`` (every sidecar of ``shoal up`` gets them)."""

    config: str | None = None
    lb: str | None = None
    grace: Annotated[float, Field(ge=0)] | None = None
    log_level: LogLevel | None = None


class UpSection(StrictModel):
    """Options of ``shoal up``."""

    workers: Annotated[int, Field(ge=1, le=32)] | None = None
    base_port: Annotated[int, Field(ge=0, le=65000)] | None = None
    lb: str | None = None
    restart: Literal["never", "always", "on-failure"] | None = None
    run_dir: str | None = None


class MeshFile(StrictModel):
    """The whole mesh file; every section is optional."""

    registry: RegistrySection = RegistrySection()
    worker: WorkerSection = WorkerSection()
    sidecar: SidecarSection = SidecarSection()
    up: UpSection = UpSection()

    def resolve_paths(self, base: Path) -> MeshFile:
        """File paths inside the mesh file are relative to the file, not to the caller."""

        def fix(value: str | None) -> str | None:
            return None if value is None else str((base / value).resolve())

        return self.model_copy(
            update={
                "worker": self.worker.model_copy(update={"config": fix(self.worker.config)}),
                "sidecar": self.sidecar.model_copy(update={"config": fix(self.sidecar.config)}),
            }
        )

    def default_map(self) -> dict[str, dict[str, Any]]:
        return {
            name: section.model_dump(exclude_none=True)
            for name, section in self
            if isinstance(section, StrictModel)
        }


def load_mesh_file(path: str | Path) -> MeshFile:
    return load_yaml(path, MeshFile).resolve_paths(Path(path).resolve().parent)


def _apply(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    mesh = load_mesh_file(value)  # ConfigError reaches the user as one line
    ctx.meta["shoal.mesh_file"] = (value, mesh)
    section = mesh.default_map().get(ctx.info_name or "")
    if section:
        ctx.default_map = {**(ctx.default_map or {}), **section}
    return value


def config_option() -> Callable[[F], F]:
    """``--config FILE`` for a command: read first, so its section becomes the defaults."""
    return click.option(
        "--config",
        "mesh_config",
        type=click.Path(dir_okay=False),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_apply,
        envvar="SHOAL_CONFIG",
        help="Mesh file (YAML); its section for this command sets defaults "
        "(flag > SHOAL_* env > file > default).",
    )
