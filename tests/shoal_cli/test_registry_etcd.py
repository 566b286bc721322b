"""Two `shoal registry --store etcd://...` processes over one real 3-member etcd: any
replica answers any call, and an instance outlives the replica it registered with."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster, requires_etcd
from tests.shoal_cli.conftest import SHOAL, reap

pytestmark = requires_etcd


@contextmanager
def replica(endpoints: list[str], *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [*SHOAL, "registry", "--listen", "127.0.0.1:0", "--store", f"etcd://{','.join(endpoints)}",
         "--ttl-min", "1", "--sweep-interval", "0.2", "--removal-grace", "2", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SHOAL_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal registry serving on "), (line, proc.stderr)
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        reap(proc)


def spec(n: int) -> pb.Instance:
    return pb.Instance(
        instance_id=f"echo-{n}", service="echo", address=f"10.0.0.9:{7000 + n}", status=pb.SERVING
    )


async def test_replicas_share_instances_and_revisions_and_outlive_each_other(tmp_path: Path):
    async with EtcdCluster(tmp_path / "etcd") as cluster:
        with replica(cluster.endpoints) as (a, at_a), replica(cluster.endpoints) as (_, at_b):
            async with (
                grpc.aio.insecure_channel(at_a) as to_a,
                grpc.aio.insecure_channel(at_b) as to_b,
            ):
                stub_a = pb_grpc.RegistryStub(to_a)
                stub_b = pb_grpc.RegistryStub(to_b)
                reply = await stub_a.Register(pb.RegisterRequest(instance=spec(1), ttl_ms=2000))
                seen = await stub_b.Discover(pb.DiscoverRequest(service="echo"))
                assert [i.instance_id for i in seen.instances] == ["echo-1"]
                assert seen.revision >= reply.revision  # etcd's revisions, on both
                # A replica B never saw register renews the lease: it is etcd's.
                renewed = await stub_b.Heartbeat(
                    pb.HeartbeatRequest(lease_id=reply.lease_id, status=pb.SERVING)
                )
                assert renewed.ttl_ms == 2000
                a.kill()  # the replica it registered with is gone
                a.wait(timeout=10)
                for _ in range(8):  # two TTLs of heartbeats, through B alone
                    await stub_b.Heartbeat(
                        pb.HeartbeatRequest(lease_id=reply.lease_id, status=pb.SERVING)
                    )
                    await asyncio.sleep(0.5)
                after = await stub_b.Discover(pb.DiscoverRequest(service="echo"))
                assert [(i.instance_id, i.healthy) for i in after.instances] == [("echo-1", True)]
                # Stopped heartbeats lapse it, then remove it, decided by the one replica left.
                listing = stub_b.Watch(
                    pb.WatchRequest(service="echo", since_revision=after.revision)
                )
                kinds = []
                async for event in listing:
                    if event.type == pb.WatchEvent.PROGRESS:
                        continue
                    kinds.append((event.type, [i.healthy for i in event.instances]))
                    if event.type == pb.WatchEvent.REMOVE:
                        break
                listing.cancel()
                assert kinds[-1][0] == pb.WatchEvent.REMOVE
                assert (pb.WatchEvent.UPSERT, [False]) in kinds  # the lapse came first
