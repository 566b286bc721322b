"""``shoal xds-bootstrap``: the file gRPC's xDS client reads, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHOAL = [sys.executable, "-m", "shoal_cli.main", "xds-bootstrap"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=30)


def test_it_writes_the_bootstrap_and_names_the_variable(tmp_path: Path) -> None:
    out = tmp_path / "xds.json"
    done = run("--registry", "10.0.0.1:7700", "--node-id", "app-1", "--cluster", "app",
               "--zone", "z1", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"set GRPC_XDS_BOOTSTRAP={out} in the client's environment")
    assert json.loads(out.read_text()) == {
        "xds_servers": [
            {
                "server_uri": "10.0.0.1:7700",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": "app-1", "cluster": "app", "locality": {"zone": "z1"}},
    }


def test_with_a_cert_dir_it_reads_the_agents_files_for_the_registry_and_the_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    done = run("--registry", "10.0.0.1:7700", "--node-id", "app-1", "--cert-dir", "certs",
               "--cert-refresh", "5", "--out", "xds.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Nothing there yet: said, not refused (the agent may start after).
    assert f"no {tmp_path}/certs/svid.pem yet; run shoal identity-agent" in done.stdout
    files = {
        # Absolute: the client may start from any directory.
        "certificate_file": f"{tmp_path}/certs/svid.pem",
        "private_key_file": f"{tmp_path}/certs/svid_key.pem",
        "ca_certificate_file": f"{tmp_path}/certs/svid_bundle.pem",
        "refresh_interval": "5s",
    }
    document = json.loads((tmp_path / "xds.json").read_text())
    (server,) = document["xds_servers"]
    assert server["channel_creds"] == [{"type": "tls", "config": files}]
    assert document["certificate_providers"] == {
        "shoal": {"plugin_name": "file_watcher", "config": files}
    }


def test_replicas_of_the_registry_are_each_an_xds_server_in_order(tmp_path: Path) -> None:
    out = tmp_path / "xds.json"
    done = run("--registry", "10.0.0.1:7700,10.0.0.2:7700", "--out", str(out))
    assert done.returncode == 0, done.stderr
    servers = json.loads(out.read_text())["xds_servers"]
    assert [s["server_uri"] for s in servers] == ["10.0.0.1:7700", "10.0.0.2:7700"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--registry", "nowhere"], "--registry"),
        (["--zone", "bad zone"], "--zone"),
        (["--node-id", "two words"], "--node-id"),
        (["--out", "/nonexistent/dir/xds.json"], "cannot write /nonexistent/dir/xds.json"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args: list[str], says: str, tmp_path: Path) -> None:
    done = run(*args) if "--out" in args else run(*args, "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("shoal: error:") and says in line
    assert not (tmp_path / "x.json").exists()
