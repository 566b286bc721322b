"""The compose mesh, end to end: real containers on a compose network of our own.

These tests need a Docker engine. Where there is none they are skipped, except
under CI, where a machine is expected to have one and a skip would hide a broken
set-up: there they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from identity.ca import trust_domain_of
from identity.workload import Credentials
from shoal_core.certify_client import certify
from tests.e2e.load import healthy_workers

ROOT = Path(__file__).resolve().parents[2]
BASE_FILE = ["-f", str(ROOT / "docker-compose.yml")]
# With the fourth worker's file too: `down` must remove what either file started.
ALL_FILES = [*BASE_FILE, "-f", str(ROOT / "docker" / "compose" / "worker4.yml")]
IMAGE = os.environ.get("SHOAL_IMAGE", "shoal:dev")


def _docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def compose_command() -> list[str]:
    """`docker compose` (v2) where the engine has it, else docker-compose 1.x."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("a Docker engine is here but neither `docker compose` nor docker-compose is")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ComposeMesh:
    project: str
    env: dict[str, str]
    compose: list[str]
    registry: str
    identity: str
    client_admin: str
    # What an operator command on the host needs (set once the mesh is up): the
    # SHOAL_* variables, and a certificate for the tests' own registry calls.
    operator_env: dict[str, str] = field(default_factory=dict)
    operator: Credentials | None = None

    @property
    def client(self) -> str:
        """The client app's container, which shares its sidecar's loopback: where load runs."""
        return self.container("client")

    def healthy_workers(self) -> set[str]:
        """The worker instances the registry routes to (asked over mTLS, as an operator)."""
        assert self.operator is not None, "the mesh's trust was not copied out"
        return healthy_workers(self.registry, self.operator)

    def trust_out(self, into: Path) -> None:
        """Copy the bundle and the operator's token out of the one-shot mesh-ca container
        (the only one that mounts the operator's volume), and certify with them."""
        mesh_ca = self.container("mesh-ca")
        files = {
            "bundle.crt": "/var/lib/shoal/trust/bundle.crt",
            "operator.token": "/var/lib/shoal/tokens/operator/token",
        }
        for name, inside in files.items():
            subprocess.run(
                ["docker", "cp", f"{mesh_ca}:{inside}", str(into / name)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        self.operator_env = {
            "SHOAL_IDENTITY_SERVER": self.identity,
            "SHOAL_TRUST_BUNDLE": str(into / "bundle.crt"),
            "SHOAL_TOKEN_FILE": str(into / "operator.token"),
        }
        bundle = (into / "bundle.crt").read_bytes()
        self.operator = asyncio.run(
            certify(
                self.identity,
                bundle_pem=bundle,
                trust_domain=trust_domain_of(bundle),
                token=(into / "operator.token").read_text().strip(),
            )
        )

    def run(
        self, *args: str, check: bool = True, files: list[str] = BASE_FILE
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-p", self.project, *files, *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=300, cwd=ROOT
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}\n{self.diagnosis()}"
            )
        return result

    def diagnosis(self) -> str:
        """Each container's state, last health checks and last log lines: why it failed."""
        label = f"label=com.docker.compose.project={self.project}"
        ids = subprocess.run(
            ["docker", "ps", "-a", "-q", "--filter", label], capture_output=True, text=True
        ).stdout.split()
        parts = []
        for cid in ids:
            state = subprocess.run(
                ["docker", "inspect", "--format",
                 "{{.Name}} {{.State.Status}} exit={{.State.ExitCode}} {{json .State.Health}}",
                 cid],
                capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            logs = subprocess.run(
                ["docker", "logs", "--tail", "15", cid], capture_output=True, text=True
            )
            parts.append(f"--- {state[:1500]}\n{(logs.stdout + logs.stderr)[-2000:]}")
        return "\n".join(parts)

    def container(self, service: str) -> str:
        """The container id of a compose service."""
        cid = self.run("ps", "-q", service, files=ALL_FILES).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def containers(self) -> list[str]:
        """The ids of this project's running containers."""
        label = f"label=com.docker.compose.project={self.project}"
        out = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc", "--filter", label],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert out, "no running container"
        return out

    def network(self) -> str:
        out = subprocess.run(
            [
                "docker",
                "network",
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(out) == 1, out
        return out[0]

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        found = []
        label = f"label=com.docker.compose.project={self.project}"
        for kind in (["ps", "-a", "-q"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            out = subprocess.run(
                ["docker", *kind, "--filter", label], capture_output=True, text=True, check=True
            ).stdout.split()
            found += [f"{kind[0]} {x}" for x in out]
        return found


@pytest.fixture(scope="session")
def image() -> str:
    if not _docker_usable():
        if os.environ.get("CI"):
            pytest.fail("CI: this machine should have a Docker engine for the compose tests")
        pytest.skip("no usable Docker engine")
    started = time.monotonic()
    build = subprocess.run(
        [str(ROOT / "scripts" / "docker-build")],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "SHOAL_IMAGE": IMAGE},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    print(f"image {IMAGE} built in {time.monotonic() - started:.0f}s")
    return IMAGE


@pytest.fixture(scope="module")
def compose_mesh(image: str) -> Iterator[ComposeMesh]:
    ports = {
        name: _free_port()
        for name in ("SHOAL_REGISTRY_PORT", "SHOAL_IDENTITY_PORT", "SHOAL_CLIENT_ADMIN_PORT")
    }
    env = {**os.environ, "SHOAL_IMAGE": image, **{k: str(v) for k, v in ports.items()}}
    mesh = ComposeMesh(
        project=f"shoale2e{uuid.uuid4().hex[:8]}",
        env=env,
        compose=compose_command(),
        registry=f"127.0.0.1:{ports['SHOAL_REGISTRY_PORT']}",
        identity=f"127.0.0.1:{ports['SHOAL_IDENTITY_PORT']}",
        client_admin=f"127.0.0.1:{ports['SHOAL_CLIENT_ADMIN_PORT']}",
    )
    with tempfile.TemporaryDirectory(prefix="shoal-e2e-trust.") as trust:
        try:
            mesh.run("up", "-d")
            mesh.trust_out(Path(trust))
            yield mesh
        finally:
            mesh.run("down", "-v", "--remove-orphans", "-t", "10", check=False, files=ALL_FILES)


# The HA mesh (docker-compose.ha.yml): three etcd members, two registry replicas.
HA_FILE = ["-f", str(ROOT / "docker-compose.ha.yml")]


def _etcd_image(image: str) -> str:
    """The etcd image scripts/docker-build tags beside ``image`` (shoal:dev -> shoal-etcd:dev)."""
    if "SHOAL_ETCD_IMAGE" in os.environ:
        return os.environ["SHOAL_ETCD_IMAGE"]
    name, colon, tag = image.rpartition(":")
    return f"{name}-etcd:{tag}" if colon and "/" not in tag else f"{image}-etcd"


@dataclass
class HAComposeMesh(ComposeMesh):
    """The HA mesh: the same helpers, over docker-compose.ha.yml, with both replicas."""

    registries: tuple[str, ...] = ()

    def run(
        self, *args: str, check: bool = True, files: list[str] = HA_FILE
    ) -> subprocess.CompletedProcess[str]:
        return super().run(*args, check=check, files=files)

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def healthy_workers(self) -> set[str]:
        """The worker instances the first replica that answers routes to."""
        assert self.operator is not None, "the mesh's trust was not copied out"
        last: Exception | None = None
        for registry in self.registries:
            try:
                return healthy_workers(registry, self.operator)
            except grpc.RpcError as exc:
                last = exc
        assert last is not None
        raise last


@pytest.fixture(scope="module")
def ha_compose_mesh(image: str) -> Iterator[HAComposeMesh]:
    etcd_image = _etcd_image(image)
    if subprocess.run(["docker", "image", "inspect", etcd_image], capture_output=True).returncode:
        message = f"no {etcd_image}: scripts/docker-build makes it from the host's etcd"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    names = (
        "SHOAL_REGISTRY_PORT",
        "SHOAL_REGISTRY2_PORT",
        "SHOAL_IDENTITY_PORT",
        "SHOAL_CLIENT_ADMIN_PORT",
    )
    ports = {name: _free_port() for name in names}
    env = {
        **os.environ,
        "SHOAL_IMAGE": image,
        "SHOAL_ETCD_IMAGE": etcd_image,
        **{k: str(v) for k, v in ports.items()},
    }
    mesh = HAComposeMesh(
        project=f"shoalha{uuid.uuid4().hex[:8]}",
        env=env,
        compose=compose_command(),
        registry=f"127.0.0.1:{ports['SHOAL_REGISTRY_PORT']}",
        identity=f"127.0.0.1:{ports['SHOAL_IDENTITY_PORT']}",
        client_admin=f"127.0.0.1:{ports['SHOAL_CLIENT_ADMIN_PORT']}",
        registries=(
            f"127.0.0.1:{ports['SHOAL_REGISTRY_PORT']}",
            f"127.0.0.1:{ports['SHOAL_REGISTRY2_PORT']}",
        ),
    )
    with tempfile.TemporaryDirectory(prefix="shoal-e2e-trust.") as trust:
        try:
            mesh.run("up", "-d")
            mesh.trust_out(Path(trust))
            yield mesh
        finally:
            mesh.run("down", "-v", "--remove-orphans", "-t", "10", check=False)
