"""The framing between the worker and its pool processes (plain bytes, no pickle).

A request is ``<IIH`` (payload length, task id, function index) then the
payload; a reply is ``<IIBd`` (body length, task id, status, seconds the
function ran) then the body. Headers are fixed-size structs so both sides parse
a whole burst of frames from one read and answer a burst with one write.

A traced call's request frame follows a TRACE frame (that function index, task id 0)
whose payload is its W3C trace context (``tracecontext.encode``); it has no reply.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "INIT",
    "REPLY",
    "REQUEST",
    "STOP",
    "TRACE",
    "Status",
    "encode_reply",
    "encode_request",
]

REQUEST = struct.Struct("<IIH")
REPLY = struct.Struct("<IIBd")

# Function indexes reserved for control frames.
INIT = 0xFFFF
STOP = 0xFFFE
TRACE = 0xFFFD
MAX_FUNCTIONS = 0xFF00


class Status(enum.IntEnum):
    """What a reply frame carries."""

    OK = 0
    ERROR = 1  # the function raised or returned a wrong type; body is the message
    TOO_LARGE = 2  # the result is over the limit; body is the message
    READY = 3  # start-up done: modules imported, warm-up calls run
    INIT_FAILED = 4  # start-up failed; body is the message


def encode_request(task_id: int, function: int, payload: bytes) -> bytes:
    return REQUEST.pack(len(payload), task_id, function) + payload


def encode_reply(task_id: int, status: Status, seconds: float, body: bytes) -> bytes:
    return REPLY.pack(len(body), task_id, status, seconds) + body
