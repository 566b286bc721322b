"""Loading YAML files that users write, validated on load.

Every error names the field, the offending value and the line it is on, so a
user can go straight to it. Models are pydantic models with ``extra="forbid"``
so a misspelt key is an error rather than a silent default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

__all__ = ["ConfigError", "StrictModel", "load_yaml", "parse_yaml"]

M = TypeVar("M", bound=pydantic.BaseModel)


class ConfigError(ValueError):
    """A config file is missing, is not YAML, or does not validate; ``str()`` is for users."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class StrictModel(pydantic.BaseModel):
    """Base for config sections: unknown keys are errors and values are immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2 has it).

    YAML 1.1 also reads yes/no/on/off as booleans, so ``ttl: no`` would quietly
    become 0 and a country code ``NO`` would become False.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _line_index(
    node: yaml.Node, path: tuple[str | int, ...], out: dict[tuple[str | int, ...], int]
) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)


def _locate(loc: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> int | None:
    # Errors on missing keys point inside a mapping that exists; walk up to it.
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def parse_yaml(text: str, model: type[M], *, source: str = "<config>") -> M:
    """Validate YAML ``text`` against ``model``; raise ``ConfigError`` naming field and line."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data: Any = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}not valid YAML ({problem})"]) from exc
    if data is None:
        data = {}
    lines: dict[tuple[str | int, ...], int] = {}
    if root is not None:
        _line_index(root, (), lines)
    if not isinstance(data, dict):
        raise ConfigError(source, ["line 1: the top level must be a mapping of keys to values"])
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = _locate(loc, lines)
            where = f"line {line}: " if line is not None else ""
            value = "" if err["type"] == "missing" else f" (got {err['input']!r})"
            problems.append(f"{where}{field}: {err['msg']}{value}")
        raise ConfigError(source, problems) from exc


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read and validate a YAML file; a missing or unreadable file is a ``ConfigError`` too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file ({exc.strerror})"]) from exc
    return parse_yaml(text, model, source=str(path))
