"""The worker's errors; the servicer maps each to one gRPC status code.

WorkerError
+-- NotFound            no command or function of that name in the allowlist
+-- PermissionDenied    the request asks for something the entry does not allow
+-- InvalidRequest      a field of the request is malformed or too large
+-- Overloaded          the bounded queue is full: rejected at once, nothing queued
+-- ShuttingDown        the worker is draining and takes no new work
+-- TaskFailed          the work ran and did not succeed
    +-- TaskError           the function raised, or returned something other than bytes
    +-- TaskTimeout         it ran past its timeout; its process group was killed
    +-- ProcessDied         its pool process died mid-task (the process is replaced)
    +-- MissingExecutable   the command's program does not exist or cannot be run
    +-- ResultTooLarge      the result is over the configured limit
"""

from __future__ import annotations

__all__ = [
    "InvalidRequest",
    "MissingExecutable",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "ProcessDied",
    "ResultTooLarge",
    "ShuttingDown",
    "TaskError",
    "TaskFailed",
    "TaskTimeout",
    "WorkerError",
]


class WorkerError(Exception):
    """Base of every error the worker reports to a caller."""


class NotFound(WorkerError):
    """The named command or function is not in this worker's allowlist."""


class PermissionDenied(WorkerError):
    """The entry exists but does not allow what the request asks (args, env, cwd)."""


class InvalidRequest(WorkerError):
    """A request field is malformed or over a limit; the message names the field."""


class Overloaded(WorkerError):
    """The queue is full; the caller should back off or go elsewhere."""


class ShuttingDown(WorkerError):
    """The worker is draining and accepts no new work."""


class TaskFailed(WorkerError):
    """The work ran and did not succeed."""


class TaskError(TaskFailed):
    """The function raised or returned a wrong type; the message says what it raised."""


class TaskTimeout(TaskFailed):
    """The work ran past its timeout; ``stdout``/``stderr`` hold any partial output."""

    def __init__(self, message: str, *, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class ProcessDied(TaskFailed):
    """The pool process running the task died; the task did not complete."""


class MissingExecutable(TaskFailed):
    """The command's program cannot be found or executed; the message names it."""


class ResultTooLarge(TaskFailed):
    """The result is larger than the configured limit."""
