"""The worker config: validation errors name field and value; platform sections merge."""

from __future__ import annotations

import math
import os

import pytest

from shoal_core.config import ConfigError, parse_yaml
from worker_node.config import WorkerConfig, current_platform, default_config, load_config
from worker_node.limits import MIB, LimitSpec, resolve_limits


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


def test_limits_left_out_take_defaults_and_unlimited_lifts_one():
    cfg = parse_yaml(
        """
commands:
  plain: {argv: [x], timeout: 2.5}
  mine:
    argv: [x]
    limits: {max_memory_mb: 512, cpu_seconds: unlimited, open_files: 4096}
  none: {argv: [x], limits: {max_memory_mb: null}}
""",
        WorkerConfig,
    )
    cpus = os.cpu_count() or 1
    resolved = {name: resolve_limits(c.limits, c.timeout) for name, c in cfg.commands.items()}
    assert resolved["plain"] == LimitSpec(4096 * MIB, math.ceil(2.5 * cpus), 1024)
    assert resolved["mine"] == LimitSpec(512 * MIB, None, 4096)
    assert resolved["none"] == LimitSpec(4096 * MIB, 30 * cpus, 1024)


@pytest.mark.parametrize("value", ["lots", 0, -5, True, 1.5, "'12'"])
def test_a_bad_limit_is_a_clear_error(value):
    msg = problems(f"commands:\n  c:\n    argv: [x]\n    limits: {{cpu_seconds: {value}}}\n")
    assert "line 4: commands.c.limits.cpu_seconds: " in msg
    assert "must be a whole number of at least 1, or 'unlimited'" in msg
    assert "open_files: Value error, must be a whole number of at least 16" in problems(
        "pools:\n  p: {limits: {open_files: 8}}\n"
    )
