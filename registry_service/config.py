"""The registry's settings: one frozen value, each field checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RegistryConfig"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    """Lease, sweep, self-preservation and watch settings; seconds unless named otherwise."""

    ttl_default: float = 10.0
    ttl_min: float = 1.0
    ttl_max: float = 300.0
    sweep_interval: float = 1.0
    # Second stage of expiry: how long a lapsed instance stays listed as unhealthy.
    removal_grace: float = 10.0
    # Self-preservation: entered when more than `preservation_share` of instances lapse
    # within `preservation_window`; left when heartbeats return or after `preservation_max`.
    preservation_share: float = 0.5
    preservation_window: float = 15.0
    preservation_max: float = 60.0
    preservation_min_instances: int = 3
    # A heartbeat that only changes the load report publishes it at most this often.
    load_publish_interval: float = 1.0
    watch_progress_interval: float = 5.0
    # A watcher's queue of changes not yet sent: past either bound it is dropped and the
    # watcher gets a fresh snapshot. A snapshot fits in one message (max_message_bytes),
    # so a backlog of several times that costs more to hold and send than the snapshot.
    watch_queue_size: int = 4096
    watch_queue_bytes: int = 4 * _MIB
    # The change history watchers resume from. At typical sizes (a few hundred bytes
    # per change) the count binds; the byte bound keeps changes with the largest
    # metadata (~80 KB each) from filling memory: 64 MiB is ~800 of those.
    history_size: int = 100_000
    history_bytes: int = 64 * _MIB
    # Instances in all, per service, and the bytes their data holds (the sum of
    # InstanceSpec.retained_bytes; the rendered copy kept for Discover and Watch adds
    # about as much again). A watch of every service (what a sidecar opens) starts with
    # one snapshot message of at most max_message_bytes (1 MiB): 10,000 instances of a
    # typical 80-100 B fit, and 10,000 is what bench/registry_bench.py runs; Consul and
    # Eureka deployments hold thousands. One service's Discover is one message too:
    # 2,000 fit with room for metadata (Kubernetes' Endpoints stops at 1,000 addresses
    # for the same reason). The byte budget binds only for large metadata: 64 MiB is
    # 10,000 instances of ~6 KB, or ~800 with the largest metadata validation allows.
    max_instances: int = 10_000
    max_instances_per_service: int = 2_000
    max_instances_bytes: int = 64 * _MIB
    max_message_bytes: int = _MIB
    # xDS (registry_service/xds): the ADS streams served at once, and the resource names
    # one stream may subscribe to. A gRPC process holds one stream per control plane
    # and four names per target, so 1,000 names is 250 targets; a stream costs its task
    # and a digest per name, so 10,000 streams (one per client process) stay small.
    xds_max_streams: int = 10_000
    xds_max_names: int = 1_000

    def __post_init__(self) -> None:
        positive = {
            "ttl_default": self.ttl_default,
            "ttl_min": self.ttl_min,
            "ttl_max": self.ttl_max,
            "sweep_interval": self.sweep_interval,
            "preservation_window": self.preservation_window,
            "preservation_max": self.preservation_max,
            "watch_progress_interval": self.watch_progress_interval,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not self.ttl_min <= self.ttl_default <= self.ttl_max:
            raise ValueError(
                f"ttl_default {self.ttl_default} must lie in ttl_min..ttl_max "
                f"({self.ttl_min}..{self.ttl_max})"
            )
        if self.removal_grace < 0 or self.load_publish_interval < 0:
            raise ValueError("removal_grace and load_publish_interval must be >= 0")
        if not 0.0 < self.preservation_share <= 1.0:
            raise ValueError(f"preservation_share must be in (0, 1], got {self.preservation_share}")
        if self.preservation_min_instances < 1:
            raise ValueError("preservation_min_instances must be >= 1")
        if self.watch_queue_size < 16 or self.history_size < 16:
            raise ValueError("watch_queue_size and history_size must be >= 16")
        if self.max_message_bytes < 4096:
            raise ValueError("max_message_bytes must be >= 4096")
        at_least = {
            "watch_queue_bytes": (self.watch_queue_bytes, 64 * 1024),
            "history_bytes": (self.history_bytes, 64 * 1024),
            "max_instances_bytes": (self.max_instances_bytes, 64 * 1024),
            "max_instances": (self.max_instances, 1),
            "max_instances_per_service": (self.max_instances_per_service, 1),
            "xds_max_streams": (self.xds_max_streams, 1),
            "xds_max_names": (self.xds_max_names, 4),
        }
        for name, (value, low) in at_least.items():
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

    def clamp_ttl(self, requested: float) -> float:
        """The TTL granted for a request: the default for 0, else clamped to min..max."""
        if requested <= 0:
            return self.ttl_default
        return min(max(requested, self.ttl_min), self.ttl_max)
