"""``shoal exec`` and ``shoal call``: run work on a worker through a sidecar (or directly)."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import grpc

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from shoal_cli.errors import UserError, WorkFailed
from shoal_cli.options import ADDRESS, F, json_option
from shoal_cli.output import emit_json

if TYPE_CHECKING:
    from protos.worker_pb2_grpc import WorkerAsyncStub

__all__ = ["call", "exec_", "via_option"]

UPSTREAM_KEY = "shoal-upstream"


def via_option() -> Callable[[F], F]:
    return click.option(
        "--via",
        type=ADDRESS,
        default="127.0.0.1:7701",
        show_default=True,
        envvar="SHOAL_VIA",
        help="Sidecar (or worker) to call through (env SHOAL_VIA).",
    )


async def trailers(call: Any) -> dict[str, str]:
    """A finished call's trailing metadata (text values only)."""
    return {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}


def served_by(meta: dict[str, str]) -> str:
    """Which instance served the call, as the client sidecar reports it."""
    return meta.get(UPSTREAM_KEY, "an instance the reply does not name (called directly?)")


def _bytes_json(name: str, data: bytes) -> dict[str, str]:
    """Bytes for JSON: as text (undecodable bytes replaced) and exactly, in base64."""
    return {
        name: data.decode("utf-8", errors="replace"),
        f"{name}_base64": base64.b64encode(data).decode("ascii"),
    }


def _parse_env(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def _failure(via: str, exc: grpc.aio.AioRpcError) -> UserError | WorkFailed:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return UserError(f"{via} is unreachable or has no healthy worker ({exc.details()})")
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        return UserError(f"{exc.details()} ({code.name})")
    return WorkFailed(f"{code.name}: {exc.details()}")


async def _invoke(via: str, start: Callable[[WorkerAsyncStub], Any]) -> tuple[Any, dict[str, str]]:
    """Run one unary Worker call through ``via``: its reply and trailing metadata."""
    async with grpc.aio.insecure_channel(via) as channel:
        rpc = start(wpb_grpc.WorkerStub(channel))
        try:
            reply = await rpc
        except grpc.aio.AioRpcError as exc:
            raise _failure(via, exc) from None
        return reply, await trailers(rpc)


async def _exec(via: str, request: wpb.ExecRequest, timeout: float, as_json: bool) -> int:
    reply, meta = await _invoke(via, lambda stub: stub.Exec(request, timeout=timeout + 5))
    if as_json:
        emit_json(
            {
                "command": request.command,
                "args": list(request.args),
                "exit_code": reply.exit_code,
                **_bytes_json("stdout", reply.stdout),
                **_bytes_json("stderr", reply.stderr),
                "duration_seconds": reply.duration_seconds,
                "pid": reply.pid,
                "truncated": reply.truncated,
                "attempts": reply.attempts,
                "served_by": meta.get(UPSTREAM_KEY),
            }
        )
        return int(reply.exit_code)
    sys.stdout.buffer.write(reply.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(reply.stderr)
    click.echo(
        f"shoal: exit {reply.exit_code} in {reply.duration_seconds:.3f}s on "
        f"{served_by(meta)} (pid {reply.pid})",
        err=True,
    )
    return int(reply.exit_code)


@click.command("exec")
@via_option()
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds the command may run.",
)
@click.option(
    "--stdin",
    "stdin_file",
    type=click.File("rb"),
    default=None,
    help="File to feed to the command's stdin ('-' for this stdin).",
)
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_parse_env,
    help="Set an environment variable for the command (repeatable); the worker's "
    "allowlist (allow_env) decides which names a caller may set.",
)
@json_option()
@click.argument("argv", nargs=-1, required=True)
def exec_(
    via: str,
    timeout: float,
    stdin_file: Any,
    env: dict[str, str],
    as_json: bool,
    argv: tuple[str, ...],
) -> int:
    """Run an allowlisted command on a worker: shoal exec -- COMMAND ARGS...

    Prints its output, then (on stderr) its exit status and which worker ran it;
    exits with the command's own status.
    """
    stdin = stdin_file.read() if stdin_file is not None else b""
    request = wpb.ExecRequest(
        command=argv[0],
        args=argv[1:],
        stdin=stdin,
        env=env,
        timeout_ms=round(timeout * 1000),
    )
    return asyncio.run(_exec(via, request, timeout, as_json))


async def _call(via: str, request: wpb.CallRequest, timeout: float, as_json: bool) -> None:
    reply, meta = await _invoke(via, lambda stub: stub.Call(request, timeout=timeout + 5))
    cache = meta.get("shoal-cache")
    if as_json:
        emit_json(
            {
                "function": request.function,
                **_bytes_json("result", reply.result),
                "run_seconds": reply.run_seconds,
                "pid": reply.pid,
                "cache": cache,
                "served_by": meta.get(UPSTREAM_KEY),
            }
        )
        return
    sys.stdout.buffer.write(reply.result)
    if sys.stdout.isatty() and not reply.result.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    cached = " from cache" if cache == "hit" else ""
    click.echo(
        f"shoal: {request.function} ran in {reply.run_seconds * 1000:.2f} ms on "
        f"{served_by(meta)} (pid {reply.pid}){cached}",
        err=True,
    )


@click.command()
@via_option()
@click.option("--data", default=None, help="Payload as text (default: read stdin).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True)
@json_option()
@click.argument("function")
def call(via: str, data: str | None, timeout: float, as_json: bool, function: str) -> None:
    """Call a worker's Python FUNCTION with a payload; print its result."""
    payload = data.encode() if data is not None else sys.stdin.buffer.read()
    request = wpb.CallRequest(function=function, payload=payload, timeout_ms=round(timeout * 1000))
    asyncio.run(_call(via, request, timeout, as_json))
