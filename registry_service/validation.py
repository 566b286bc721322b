"""Checks on what callers send, each failure naming the field it is about.

Limits are generous for real use and tight enough that one caller cannot make
the registry hold or fan out unbounded data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from registry_service.errors import InvalidArgument
from registry_service.model import DEFAULT_WEIGHT, InstanceSpec, LoadReport, ServingStatus
from shoal_core.addresses import AddressError, parse_address

__all__ = [
    "check_lease_id",
    "check_load",
    "check_service_name",
    "check_status",
    "make_spec",
    "MAX_TTL_MS",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_GRPC_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")

MAX_NAME = 128
MAX_GRPC_SERVICE = 256
MAX_GRPC_SERVICES = 64
MAX_METADATA = 64
MAX_META_VALUE = 1024
MAX_WEIGHT = 10_000
MAX_LEASE_ID = 64
# A TTL beyond a day is a mistake, not a preference to clamp: reject it.
MAX_TTL_MS = 86_400_000


def _check_name(field: str, value: str, pattern: re.Pattern[str], limit: int) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; the limit is {limit}")
    if not pattern.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} has characters outside {pattern.pattern}")
    return value


def check_service_name(field: str, value: str) -> str:
    return _check_name(field, value, _NAME, MAX_NAME)


def check_lease_id(value: str) -> str:
    if not value:
        raise InvalidArgument("lease_id", "must not be empty")
    if len(value) > MAX_LEASE_ID:
        raise InvalidArgument("lease_id", f"is longer than {MAX_LEASE_ID} characters")
    return value


def check_status(field: str, value: int) -> ServingStatus:
    if value == 0:
        return ServingStatus.SERVING
    try:
        return ServingStatus(value)
    except ValueError:
        raise InvalidArgument(field, f"{value} is not SERVING, NOT_SERVING or DRAINING") from None


def check_load(
    field: str, in_flight: int, queue_depth: int, cpu_percent: float, memory_bytes: int
) -> LoadReport:
    if not math.isfinite(cpu_percent) or not 0.0 <= cpu_percent <= 100_000.0:
        raise InvalidArgument(f"{field}.cpu_percent", f"{cpu_percent} is not in 0..100000")
    return LoadReport(in_flight, queue_depth, cpu_percent, memory_bytes)


def _check_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(
            "instance.metadata", f"has {len(metadata)} keys; the limit is {MAX_METADATA}"
        )
    for key, value in metadata.items():
        _check_name("instance.metadata key", key, _META_KEY, MAX_NAME)
        if len(value) > MAX_META_VALUE:
            raise InvalidArgument(
                f"instance.metadata[{key}]", f"is longer than {MAX_META_VALUE} characters"
            )
    return MappingProxyType(dict(metadata))


def make_spec(
    *,
    instance_id: str,
    service: str,
    address: str,
    grpc_services: Iterable[str],
    metadata: Mapping[str, str],
    weight: int,
    zone: str,
) -> InstanceSpec:
    """Build a checked ``InstanceSpec``; raise ``InvalidArgument`` naming the first bad field."""
    _check_name("instance.instance_id", instance_id, _INSTANCE_ID, MAX_NAME)
    check_service_name("instance.service", service)
    try:
        parse_address(address)
    except AddressError as exc:
        raise InvalidArgument("instance.address", str(exc)) from None
    names = tuple(grpc_services)
    if len(names) > MAX_GRPC_SERVICES:
        raise InvalidArgument(
            "instance.grpc_services", f"has {len(names)} names; the limit is {MAX_GRPC_SERVICES}"
        )
    for name in names:
        _check_name("instance.grpc_services", name, _GRPC_SERVICE, MAX_GRPC_SERVICE)
    if weight > MAX_WEIGHT:
        raise InvalidArgument("instance.weight", f"{weight} is above {MAX_WEIGHT}")
    if zone:
        check_service_name("instance.zone", zone)
    return InstanceSpec(
        instance_id=instance_id,
        service=service,
        address=address,
        grpc_services=tuple(dict.fromkeys(names)),
        metadata=_check_metadata(metadata),
        weight=weight or DEFAULT_WEIGHT,
        zone=zone,
    )
