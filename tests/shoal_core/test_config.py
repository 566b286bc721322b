"""YAML config loading: errors name the field, the value and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from shoal_core.config import ConfigError, StrictModel, load_yaml, parse_yaml


class Limits(StrictModel):
    max_memory_mb: int = Field(gt=0)


class Command(StrictModel):
    argv: list[str] = Field(min_length=1)
    limits: Limits | None = None


class Example(StrictModel):
    name: str
    commands: dict[str, Command] = {}


def test_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("name: w1\ncommands:\n  hello:\n    argv: [echo, hi]\n")
    loaded = load_yaml(path, Example)
    assert loaded.commands["hello"].argv == ["echo", "hi"]


def test_errors_point_at_field_value_and_line() -> None:
    text = "name: w1\ncommands:\n  hello:\n    argv: [echo]\n    limits:\n      max_memory_mb: -5\n"
    with pytest.raises(ConfigError) as err:
        parse_yaml(text, Example, source="w.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("line 6: commands.hello.limits.max_memory_mb:")
    assert "-5" in problem and str(err.value).startswith("w.yaml: ")


def test_unknown_and_missing_keys_are_errors() -> None:
    with pytest.raises(ConfigError) as err:
        parse_yaml("nmae: w1\n", Example)
    problems = " | ".join(err.value.problems)
    assert "line 1: nmae: Extra inputs are not permitted" in problems
    assert "name: Field required" in problems


def test_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2: not valid YAML"):
        parse_yaml("name: [w1\nx: }\n", Example)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_yaml("- a\n- b\n", Example)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_yaml(tmp_path / "missing.yaml", Example)
