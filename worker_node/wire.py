"""Conversions to wire messages (protobuf, no gRPC): stats and process reports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psutil

from protos import worker_pb2 as pb
from worker_node.cache import ResponseCache
from worker_node.pool import Pool
from worker_node.poolproc import PoolProcess
from worker_node.procs import CpuSampler, children_of, report
from worker_node.stats import WorkerStats

__all__ = ["list_processes", "stats_reply"]


def stats_reply(
    stats: WorkerStats, pools: Iterable[Pool], cache: ResponseCache[object], exec_running: int
) -> pb.StatsReply:
    reply = pb.StatsReply(uptime_seconds=stats.uptime, echo_total=stats.echo_total)
    for name, method in sorted(stats.methods.items()):
        hist = method.latency
        reply.methods.add(
            method=name,
            total=method.total,
            ok=method.ok,
            failed=method.failed,
            p50_ms=hist.quantile(0.5) * 1000,
            p90_ms=hist.quantile(0.9) * 1000,
            p99_ms=hist.quantile(0.99) * 1000,
        )
    for pool in pools:
        c = pool.counters
        cfg = pool.config
        reply.pools.add(
            name=pool.name,
            size=pool.size,
            min=cfg.min,
            max=cfg.max,
            busy=pool.busy,
            starting=pool.starting,
            queued=pool.queued,
            queue_limit=cfg.queue,
            running=pool.running,
            restart_policy=cfg.restart,
            tasks_done=c.tasks_done,
            tasks_failed=c.tasks_failed,
            processes_started=c.started,
            processes_died=c.died,
            processes_restarted=c.restarted,
            rejected=c.rejected,
        )
        reply.tasks_running += pool.running
        reply.tasks_queued += pool.queued
    counters = cache.counters
    reply.cache.CopyFrom(
        pb.CacheStats(
            hits=counters.hits,
            misses=counters.misses,
            evictions=counters.evictions,
            expirations=counters.expirations,
            entries=len(cache),
            bytes=cache.size_bytes,
            max_entries=cache.max_entries,
            max_bytes=cache.max_bytes,
            coalesced=counters.coalesced,
        )
    )
    reply.exec_running = exec_running
    return reply


def _info(sampler: CpuSampler, pid: int, role: str, owner: str) -> pb.ProcessInfo | None:
    found = report(sampler, pid)
    if found is None:
        return None
    return pb.ProcessInfo(
        pid=found.pid,
        ppid=found.ppid,
        cmdline=found.cmdline,
        rss_bytes=found.rss_bytes,
        cpu_percent=found.cpu_percent,
        status=found.status,
        role=role,
        owner=owner,
    )


def _state(proc: PoolProcess) -> str:
    if proc.state.value in ("stopping", "starting"):
        return proc.state.value
    return "busy" if proc.inflight else "idle"


def list_processes(
    sampler: CpuSampler,
    pools: Iterable[Pool],
    commands: Mapping[int, str],
    spawners: Iterable[int] = (),
) -> list[pb.ProcessInfo]:
    """Pool processes, running commands, command spawners and whatever each started."""
    out: list[pb.ProcessInfo] = []
    roots: list[tuple[int, str, str, PoolProcess | None]] = [
        (proc.pid, "pool", pool.name, proc) for pool in pools for proc in pool.processes()
    ]
    roots += [(pid, "exec", name, None) for pid, name in commands.items()]
    # A spawner's children are the commands above: list the spawner alone.
    spawner_roots = [(pid, "spawner", "exec", None) for pid in spawners]
    for pid, role, owner, proc in [*roots, *spawner_roots]:
        info = _info(sampler, pid, role, owner)
        if info is None:
            continue
        if proc is not None:
            info.state = _state(proc)
            info.tasks_done = proc.tasks_done
        out.append(info)
        if role == "spawner":
            continue
        for child in children_of(pid):
            child_info = _info(sampler, child, "child", owner)
            if child_info is not None:
                out.append(child_info)
    sampler.forget_missing({info.pid for info in out} | {psutil.Process().pid})
    return out
