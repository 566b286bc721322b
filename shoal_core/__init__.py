"""What every Shoal service shares: server lifecycle, addresses, config, logs, metrics.

Nothing here knows about a particular service; service packages import this
package and never each other.
"""

from __future__ import annotations

from shoal_core.addresses import AddressError, HostPort, parse_address
from shoal_core.lifecycle import Service, serve

__all__ = ["AddressError", "HostPort", "Service", "parse_address", "serve"]
