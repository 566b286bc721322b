"""Parsing and checking ``host:port`` addresses, the one format every Shoal flag uses."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["AddressError", "HostPort", "dial_address", "parse_address"]

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_ADDRESS_LENGTH = 261  # 253 for the longest name, brackets, colon and five digits


class AddressError(ValueError):
    """An address is not ``host:port`` with a valid host and a port in 1..65535."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """A checked address; ``str()`` gives the form gRPC targets accept."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_LABEL.match(label) for label in labels)


def parse_address(text: str, *, allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; ``allow_port_zero`` is for listen addresses."""
    if not text or len(text) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"address {text[:64]!r} must be host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(f"address {text!r} must be [ipv6]:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"address {text!r} has an invalid IPv6 host") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"address {text!r} must be host:port")
        if ":" in host:
            raise AddressError(f"address {text!r}: put an IPv6 host in brackets")
        if not _valid_host(host):
            raise AddressError(f"address {text!r} has an invalid host {host!r}")
    if not port_text.isdigit():
        raise AddressError(f"address {text!r} has a non-numeric port")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise AddressError(f"address {text!r} has port {port} outside 1..65535")
    return HostPort(host, port)


def dial_address(listen: str, port: int) -> str:
    """Where a local client reaches a server bound to ``listen`` on ``port``.

    A wildcard host (all interfaces) is not an address to dial: loopback is.
    """
    host = parse_address(listen, allow_port_zero=True).host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return str(HostPort(host, port))
