"""The worker's config file: the allowlist of commands and functions, pools, cache.

Nothing runs unless it is named here. Each pool, function and command entry may
carry ``linux``, ``macos`` and ``windows`` sections; the one for the running
platform is merged over the entry (mappings merged key by key, other values
replaced) before validation, and the others are still checked for unknown keys.
Errors name the field, the value and the line (``shoal_core.config``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Self

import pydantic
from pydantic import Field

from shoal_core.config import StrictModel, load_yaml
from worker_node.limits import UNLIMITED

__all__ = [
    "CacheConfig",
    "CommandConfig",
    "ExecConfig",
    "FunctionConfig",
    "Limits",
    "PoolConfig",
    "RestartPolicy",
    "WorkerConfig",
    "current_platform",
    "default_config",
    "load_config",
]

RestartPolicy = Literal["never", "always", "on-failure", "unless-stopped"]

PLATFORMS = ("linux", "macos", "windows")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
MIB = 1024 * 1024
Unlimited = Literal["unlimited"]
_LEAST = {"max_memory_mb": 16, "cpu_seconds": 1, "open_files": 16}


def current_platform() -> str:
    if sys.platform.startswith("win"):
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Entry(StrictModel):
    """An entry with per-platform sections merged over it before validation."""

    @pydantic.model_validator(mode="before")
    @classmethod
    def _merge_platform(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        sections = {name: data.pop(name) for name in PLATFORMS if name in data}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ValueError(f"{name} must be a mapping of overrides, got {section!r}")
            unknown = sorted(set(section) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"{name} has unknown key(s) {', '.join(map(repr, unknown))}")
        mine = sections.get(current_platform())
        return _merge(data, mine) if mine else data


class Limits(StrictModel):
    """Resource limits: rlimits on Linux/macOS, a psutil watchdog where rlimits don't exist.

    A limit left out (or null) takes its default (``worker_node.limits``): 4096 MiB
    of address space, 1024 open files, and CPU time the entry's timeout times the
    machine's CPUs (for a pool, per task: each function's timeout). ``unlimited``
    lifts one limit.
    """

    max_memory_mb: int | Unlimited | None = None
    cpu_seconds: int | Unlimited | None = None
    open_files: int | Unlimited | None = None

    @pydantic.field_validator("max_memory_mb", "cpu_seconds", "open_files", mode="before")
    @classmethod
    def _check_limit(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        least = _LEAST[str(info.field_name)]
        if value is None or value == UNLIMITED:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"must be a whole number of at least {least}, or {UNLIMITED!r}")
        return value


class PoolConfig(_Entry):
    """A pool of warm Python processes that run the functions assigned to it."""

    min: int = Field(default=1, ge=0, le=256)
    max: int = Field(default=2, ge=1, le=256)
    # Tasks waiting for a process; beyond this, calls are refused at once.
    queue: int = Field(default=1024, ge=1, le=1_000_000)
    idle_timeout: float = Field(default=30.0, gt=0)
    # Grow when busy processes / live processes reaches this and work is waiting.
    scale_up_at: float = Field(default=0.75, gt=0, le=1)
    restart: RestartPolicy = "always"
    start_timeout: float = Field(default=30.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    limits: Limits = Limits()

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class FunctionConfig(_Entry):
    """A Python function, ``module:function``, taking bytes and returning bytes."""

    target: str
    pool: str = "default"
    timeout: float = Field(default=30.0, gt=0, le=86_400)
    cacheable: bool = False
    # When set, each new pool process calls the function with these bytes before taking work.
    warmup: str | None = None

    @pydantic.field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        if not _TARGET.fullmatch(value):
            raise ValueError(f"must look like package.module:function, got {value!r}")
        return value


class CommandConfig(_Entry):
    """A program the worker may run: an argv list, never a shell."""

    argv: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: bool = True
    allow_args: bool = False
    # Environment names a caller may set; anything else is refused.
    allow_env: list[str] = Field(default_factory=list)
    allow_cwd: bool = False
    timeout: float = Field(default=30.0, gt=0, le=86_400)
    cacheable: bool = False
    # For a one-shot command the policy decides when it is run again, up to max_restarts.
    restart: RestartPolicy = "never"
    max_restarts: int = Field(default=3, ge=0, le=100)
    limits: Limits = Limits()

    @pydantic.field_validator("argv")
    @classmethod
    def _check_argv(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the program (argv[0]) must not be empty")
        if any("\0" in arg for arg in value):
            raise ValueError("arguments must not contain NUL characters")
        return value


class CacheConfig(StrictModel):
    """The response cache for cacheable commands and functions."""

    ttl: float = Field(default=60.0, gt=0)
    max_entries: int = Field(default=4096, ge=1)
    max_bytes: int = Field(default=64 * MIB, ge=1024)


class ExecConfig(StrictModel):
    """Bounds on commands running at once and on what they may return."""

    max_concurrent: int = Field(default=16, ge=1, le=4096)
    queue: int = Field(default=256, ge=0, le=1_000_000)
    max_output_bytes: int = Field(default=4 * MIB, ge=1024)


class WorkerConfig(StrictModel):
    """The whole config file."""

    max_message_bytes: int = Field(default=8 * MIB, ge=4096)
    max_payload_bytes: int = Field(default=4 * MIB, ge=1)
    max_result_bytes: int = Field(default=4 * MIB, ge=1)
    # CallStream items in flight per stream; past it the stream stops reading.
    stream_window: int = Field(default=256, ge=1, le=100_000)
    pools: dict[str, PoolConfig] = Field(default_factory=lambda: {"default": PoolConfig()})
    functions: dict[str, FunctionConfig] = Field(default_factory=dict)
    commands: dict[str, CommandConfig] = Field(default_factory=dict)
    cache: CacheConfig = CacheConfig()
    exec: ExecConfig = ExecConfig()

    @pydantic.field_validator("pools", "functions", "commands")
    @classmethod
    def _check_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"name {name!r} must match {_NAME.pattern}")
        return value

    @pydantic.model_validator(mode="after")
    def _check_pools(self) -> Self:
        for name, fn in self.functions.items():
            if fn.pool not in self.pools:
                raise ValueError(
                    f"functions.{name}.pool: no pool named {fn.pool!r} "
                    f"(pools: {', '.join(sorted(self.pools)) or 'none'})"
                )
        return self


DEMO_FUNCTIONS = {
    "noop": "worker_node.demo_tasks:noop",
    "echo": "worker_node.demo_tasks:echo",
    "upper": "worker_node.demo_tasks:upper",
    "sleep": "worker_node.demo_tasks:sleep",
    "crash": "worker_node.demo_tasks:crash",
    "hash": "worker_node.demo_tasks:sha256",
}


def default_config() -> WorkerConfig:
    """What a worker runs with no config file: Echo and the demo functions, no commands."""
    functions = {
        name: FunctionConfig(
            target=target, cacheable=name == "hash", warmup="" if name == "noop" else None
        )
        for name, target in DEMO_FUNCTIONS.items()
    }
    size = max(2, os.cpu_count() or 2)
    return WorkerConfig(pools={"default": PoolConfig(min=1, max=size)}, functions=functions)


def load_config(path: str | Path | None) -> WorkerConfig:
    """Load and validate ``path``; ``None`` gives ``default_config()``."""
    return default_config() if path is None else load_yaml(path, WorkerConfig)
