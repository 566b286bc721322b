"""The worker config: validation errors name field and value; platform sections merge."""

from __future__ import annotations

import pytest

from shoal_core.config import ConfigError, parse_yaml
from worker_node.config import WorkerConfig, current_platform, default_config, load_config


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_yaml(text, WorkerConfig, source="w.yaml")
    return str(err.value)


def test_errors_name_the_field_the_value_and_the_line():
    text = "pools:\n  default:\n    restart: sometimes\n"
    msg = problems(text)
    assert "line 3: pools.default.restart" in msg and "'sometimes'" in msg
    assert "min (5) must not exceed max (2)" in problems("pools:\n  p: {min: 5, max: 2}\n")
    assert "functions.f.target" in problems("functions:\n  f: {target: 'not a target'}\n")
    assert "'not a target'" in problems("functions:\n  f: {target: 'not a target'}\n")
    assert "commands.c.argv" in problems("commands:\n  c: {argv: []}\n")
    assert "commands.c.colour" in problems("commands:\n  c: {argv: [ls], colour: red}\n")
    msg = problems("functions:\n  f: {target: 'm:f', pool: fast}\n")
    assert "no pool named 'fast'" in msg


def test_platform_sections_merge_over_the_entry():
    here = current_platform()
    other = "windows" if here != "windows" else "linux"
    text = f"""
commands:
  c:
    argv: [base]
    env: {{A: "1"}}
    {here}: {{argv: [mine], env: {{B: "2"}}}}
    {other}: {{argv: [theirs]}}
"""
    cmd = parse_yaml(text, WorkerConfig).commands["c"]
    assert cmd.argv == ["mine"]
    assert cmd.env == {"A": "1", "B": "2"}
    assert "macos has unknown key(s) 'argvv'" in problems(
        "commands:\n  c: {argv: [x], macos: {argvv: [y]}}\n"
    )


def test_defaults_and_the_example_file_load():
    cfg = default_config()
    assert {"noop", "echo", "upper", "sleep", "crash", "hash"} <= set(cfg.functions)
    assert cfg.commands == {}
    example = load_config("examples/worker.yaml")
    assert "say" in example.commands and example.pools["default"].max == 4
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config("/nonexistent/worker.yaml")
