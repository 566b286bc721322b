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


class Flags(StrictModel):
    allow_args: bool = False
    inherit_env: bool | None = None
    per_name: dict[str, bool] = {}
    pair: tuple[int, int] = (0, 0)
    ratio: float = 1.0


@pytest.mark.parametrize("value", ["y", "n", "on", "off", "yes", "no", "1", "0", "'true'"])
def test_only_yaml_booleans_are_booleans(value: str) -> None:
    for text in (
        f"allow_args: {value}\n",
        f"inherit_env: {value}\n",
        f"per_name:\n  a: true\n  b: {value}\n",
    ):
        with pytest.raises(ConfigError) as err:
            parse_yaml(text, Flags, source="f.yaml")
        (problem,) = err.value.problems
        assert problem.startswith(f"line {text.count(chr(10))}: "), problem
        assert "must be true or false" in problem, problem


def test_booleans_load_and_other_fields_stay_lax() -> None:
    text = "allow_args: true\ninherit_env: False\nper_name: {a: TRUE}\npair: [1, 2]\nratio: 2\n"
    loaded = parse_yaml(text, Flags)
    assert loaded.allow_args is True and loaded.inherit_env is False
    assert loaded.per_name == {"a": True}
    assert loaded.pair == (1, 2) and loaded.ratio == 2.0  # a list for a tuple, an int for a float


def test_a_recursive_alias_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_yaml("name: w1\ncommands: &c\n  hello: *c\n", Example, source="r.yaml")
    assert err.value.problems == ["line 3: the alias *c refers to a value that contains it"]
    assert str(err.value).startswith("r.yaml: ")


def test_aliases_that_expand_past_a_bound_are_a_config_error() -> None:
    # "Billion laughs": each level repeats the one before it ten times.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml("\n".join(lines) + "\n", Example)


def test_nesting_too_deep_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="line 1: nested more than 64 levels deep"):
        parse_yaml("name: " + "[" * 5000 + "]" * 5000 + "\n", Example)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: w1\ncommands: {}  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_yaml(path, Example)
    assert err.value.source == str(path)
    assert err.value.problems == ["line 2: not UTF-8 text (byte 0xe9)"]
