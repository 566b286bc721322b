"""`shoal policy set/show/check` against a real registry process, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from identity.authz import load_policy, parse_policy
from tests.shoal_cli.conftest import SHOAL, reap

Registry = tuple[subprocess.Popen[str], str]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
EXEC = "/shoal.worker.v1.Worker/Exec"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=30)


def check(source: str, destination: str, method: str, *more: str):
    return run("policy", "check", "--from", source, "--to", destination, "--method", method, *more)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_set_then_show_gives_back_the_policy_as_yaml_set_takes(
    registry_process: Registry, tmp_path: Path
) -> None:
    _, address = registry_process
    result = run("policy", "set", str(EXAMPLE), "--registry", address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("policy version ")
    assert result.stdout.rstrip().endswith("set: 4 rules, default deny")
    version = int(result.stdout.split()[2])

    shown = run("policy", "show", "--registry", address)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# policy version {version}: 4 rules, default deny\n")
    assert parse_policy(shown.stdout) == load_policy(EXAMPLE)
    # What show prints is a file set takes back unchanged.
    again = tmp_path / "again.yaml"
    again.write_text(shown.stdout)
    assert run("policy", "set", str(again), "--registry", address).returncode == 0

    as_json = json.loads(run("policy", "show", "--registry", address, "--json").stdout)
    assert as_json["version"] > version
    assert as_json["default"] == "deny" and as_json["rules"][1]["from"] == ["client"]


def test_check_says_allowed_or_denied_with_the_deciding_rule(registry_process: Registry) -> None:
    _, address = registry_process
    # Before any policy: everything is allowed, by the default.
    result = check("a", "worker", EXEC, "--registry", address)
    assert (result.returncode, result.stdout.strip()) == (
        0,
        f"allowed: a -> worker {EXEC}, by the mesh default (allow)",
    )
    assert run("policy", "set", str(EXAMPLE), "--registry", address).returncode == 0
    denied = check("monitor", "worker", EXEC, "--registry", address)
    assert (denied.returncode, denied.stdout.strip()) == (
        1,
        f"denied: monitor -> worker {EXEC}, by rule 'no-one-else-runs-work' (deny)",
    )
    allowed = check("client", "worker", EXEC, "--registry", address, "--json")
    assert allowed.returncode == 0, allowed.stderr
    out = json.loads(allowed.stdout)
    assert (out["allowed"], out["reason"]) == (True, "rule 'client-runs-work' (allow)")
    assert out["version"] > 0


def test_check_against_a_file_needs_no_registry() -> None:
    stats = "/shoal.worker.v1.Worker/Stats"
    result = check("rogue", "worker", stats, "--file", str(EXAMPLE), "--registry", "127.0.0.1:1")
    assert (result.returncode, result.stdout.strip()) == (
        1,
        "denied: rogue -> worker /shoal.worker.v1.Worker/Stats, by the mesh default (deny)",
    )


def test_a_bad_policy_file_is_one_line_exit_2_and_nothing_is_sent(
    registry_process: Registry, tmp_path: Path
) -> None:
    _, address = registry_process
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: deny\nrules:\n  - {from: [client], to: worker, methods: [Exec]}\n")
    line = _one_error_line(run("policy", "set", str(bad), "--registry", address))
    assert line.startswith(f"shoal: error: {bad}: line 3: rules.0.methods.0: "), line
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    line = _one_error_line(run("policy", "set", str(broken), "--registry", address))
    assert f"{broken}: line 2: not valid YAML" in line, line
    missing = _one_error_line(run("policy", "set", str(tmp_path / "none.yaml")))
    assert "none.yaml: cannot read file" in missing
    shown = run("policy", "show", "--registry", address, "--json")
    assert json.loads(shown.stdout)["rules"] == []


def test_user_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    line = _one_error_line(run("policy", "show", "--registry", "127.0.0.1:1"))
    assert "registry 127.0.0.1:1 is unreachable" in line
    line = _one_error_line(check("a", "b", "Exec", "--file", str(EXAMPLE)))
    assert "--method: 'Exec' is not a method path" in line
    line = _one_error_line(check("a/b", "b", EXEC, "--file", str(EXAMPLE)))
    assert line.startswith("shoal: error: --from: ")


def test_the_registry_starts_with_the_policy_file_it_is_given(tmp_path: Path) -> None:
    env = {**os.environ, "SHOAL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [*SHOAL, "registry", "--listen", "127.0.0.1:0", "--policy", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal registry serving on "), line
        address = line.rsplit(" ", 1)[1].strip()
        shown = run("policy", "show", "--registry", address)
        assert yaml.safe_load(shown.stdout) == load_policy(EXAMPLE).to_data()
    finally:
        reap(proc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: never\n")
    line = _one_error_line(
        subprocess.run(
            [*SHOAL, "registry", "--listen", "127.0.0.1:0", "--policy", str(bad)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    )
    assert f"{bad}: line 1: default: " in line
