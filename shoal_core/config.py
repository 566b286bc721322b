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
import pydantic_core
import yaml

from shoal_core.errors import ConfigError

__all__ = ["ConfigError", "StrictModel", "load_yaml", "parse_yaml"]

M = TypeVar("M", bound=pydantic.BaseModel)


def _strict_bools(schema: Any) -> None:
    """Make every bool in a core schema take only real booleans, nothing else in it."""
    if isinstance(schema, dict):
        if schema.get("type") == "bool":
            schema["strict"] = True
        for value in schema.values():
            _strict_bools(value)
    elif isinstance(schema, list):
        for item in schema:
            _strict_bools(item)


class StrictModel(pydantic.BaseModel):
    """Base for config sections: unknown keys are errors and values are immutable.

    Booleans are only ``true`` and ``false``: in lax mode pydantic would also read
    the strings ``y``, ``on``, ``yes``, ``1`` (and the number 1) as True. The rest of
    the model stays lax (a YAML list still fills a tuple field, an int a float).
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[pydantic.BaseModel], handler: pydantic.GetCoreSchemaHandler, /
    ) -> pydantic_core.CoreSchema:
        schema = handler(source)
        _strict_bools(schema)
        return schema


class _Refused(yaml.composer.ComposerError):
    """Well-formed YAML this loader will not load (see ``_Loader``)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(None, None, problem, mark)


# Aliases let a few lines stand for a huge value ("billion laughs"): past this many
# values once expanded, a file is refused rather than validated for hours. Nesting
# is bounded too (composing recurses).
MAX_VALUES = 100_000
MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2 has it), and bounded.

    YAML 1.1 also reads yes/no/on/off as booleans, so ``ttl: no`` would quietly
    become 0 and a country code ``NO`` would become False. An alias inside the value
    it names (a cycle), aliases expanding past ``MAX_VALUES`` values and nesting past
    ``MAX_DEPTH`` are errors at the line where they happen.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # expanded size of each node composed so far
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            named = self.anchors.get(event.anchor or "")
            if named is not None and id(named) not in self._sizes:
                problem = f"the alias *{event.anchor} refers to a value that contains it"
                raise _Refused(problem, mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        parts: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            parts = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            parts = list(node.value)
        size = 1 + sum(self._sizes.get(id(part), 1) for part in parts)
        if size > MAX_VALUES:
            raise _Refused(f"expands to more than {MAX_VALUES} values through aliases", mark)
        self._sizes[id(node)] = size
        return node


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


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_yaml(text: str, model: type[M], *, source: str = "<config>") -> M:
    """Validate YAML ``text`` against ``model``; raise ``ConfigError`` naming field and line."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data: Any = None if root is None else loader.construct_document(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, _Refused):
            raise ConfigError(source, [f"{where}{problem}"]) from None
        raise ConfigError(source, [f"{where}not valid YAML ({problem})"]) from None
    finally:
        loader.dispose()
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
            value = "" if err["type"] == "missing" else f" (got {_short(err['input'])})"
            message = "must be true or false" if err["type"] == "bool_type" else err["msg"]
            problems.append(f"{where}{field}: {message}{value}")
        raise ConfigError(source, problems) from exc


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read and validate a YAML file; a missing, unreadable or non-UTF-8 file is a
    ``ConfigError`` too."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file ({exc.strerror})"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = f"line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})"
        raise ConfigError(str(path), [problem]) from None
    return parse_yaml(text, model, source=str(path))
