"""Controller configuration: frozen dataclasses, one docstring per field, checked on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping

from kvstore.copy_ops import copy_backend_names
from kvstore.eviction import DEFAULT_POLICY, policy_names

WritePolicy = Literal["write_back", "write_through", "write_through_selective"]
WRITE_POLICIES: tuple[str, ...] = ("write_back", "write_through", "write_through_selective")


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and how to fix it."""


# connectors.codec.ENCODINGS, named here so that config does not import the connectors
L3_ENCODINGS: tuple[str, ...] = ("lossless", "fp8_e4m3")


@dataclass(frozen=True)
class L3Config:
    """Which L3 store backs the host pool, if any."""

    connector: str | None = None
    """Connector name ("disk", "redis", "redis_cluster", "mooncake", "memory"), or None for no L3."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Connector options, e.g. {"path": "/var/cache/kvstore", "capacity_bytes": 64 << 30}."""
    write_policy: WritePolicy = "write_back"
    """``write_back``: a page goes to L3 when L2 evicts it. ``write_through``: every new
    page goes to L3 as soon as it is stored in L2. ``write_through_selective``: a page
    goes to L3 once it has had ``selective_hits`` lookup hits (and at eviction, so
    nothing is lost). Writes go through a background queue either way."""
    selective_hits: int = 2
    """``write_through_selective``: lookup hits after which a page is written to L3."""
    backup_queue_bytes: int = 256 << 20
    """Memory for pages evicted from L2 before their L3 write ran (write_back copies them
    out so the slot can be reused); a page that does not fit is dropped and counted."""
    timeout_s: float = 30.0
    """Longest wait for one batched L3 call before it counts as failed."""
    close_flush_s: float = 60.0
    """At close (and daemon shutdown), how long to spend writing the pages that L3
    does not hold yet (write_back keeps them in L2 only); 0 writes none."""
    encoding: str = "lossless"
    """How pages are kept in L3: ``lossless`` (the page's own bytes) or ``fp8_e4m3``: half
    the bytes, LOSSY (each element to within 1/16 of itself; connectors/fp8.py), bf16
    layouts only. Decoded to bf16 on the host as pages come back into L2; L2 and the
    engine's pool stay bf16. A page stored under the other encoding reads as a miss."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.write_policy not in WRITE_POLICIES:
            raise ConfigError(
                f"L3Config.write_policy {self.write_policy!r} is unknown; use one of {WRITE_POLICIES}"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"L3Config.timeout_s must be > 0 seconds, got {self.timeout_s}")
        for name in ("selective_hits", "backup_queue_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"L3Config.{name} must be a positive int, got {value!r}")
        if not isinstance(self.close_flush_s, (int, float)) or self.close_flush_s < 0:
            raise ConfigError(f"L3Config.close_flush_s must be >= 0 seconds, got {self.close_flush_s!r}")
        if self.encoding not in L3_ENCODINGS:
            raise ConfigError(f"L3Config.encoding {self.encoding!r} is unknown; use one of {L3_ENCODINGS}")


PREFETCH_POLICIES: tuple[str, ...] = ("wait_complete", "best_effort", "timeout", "sync")


@dataclass(frozen=True)
class PrefetchConfig:
    """How L3 pages come back up into L2 (the prefetch pipeline)."""

    policy: str = "wait_complete"
    """What ``lookup`` does about pages that are only in L3. ``wait_complete``: start a
    prefetch and wait for it. ``best_effort``: start it and return the L2 hit at once
    (a later lookup finds what has arrived). ``timeout``: wait at most
    ``timeout_base_s + timeout_per_1k_tokens_s * tokens / 1000``. ``sync``: read them on
    the caller's call in one batch, unpipelined (the behaviour before prefetch)."""
    timeout_base_s: float = 0.002
    """``timeout`` policy: the fixed part of the wait."""
    timeout_per_1k_tokens_s: float = 0.001
    """``timeout`` policy: the wait added per 1,000 prompt tokens."""
    batch_pages: int = 32
    """Pages per L3 read; reads of a prefetch run one batch after another."""
    max_inflight_bytes: int = 256 << 20
    """Bytes of all prefetch reads in flight at once (bounds reserved L2 slots)."""
    hold_s: float = 30.0
    """How long the pages a finished prefetch brought up stay leased for the request it
    was started for (a lookup of the chain takes them over sooner); 0 holds none."""
    max_hold_fraction: float = 0.5
    """Largest share of L2 that held prefetched pages may pin; past it the oldest hold ends."""

    def __post_init__(self) -> None:
        if self.policy not in PREFETCH_POLICIES:
            raise ConfigError(f"PrefetchConfig.policy {self.policy!r} is unknown; use one of {PREFETCH_POLICIES}")
        if not isinstance(self.max_hold_fraction, (int, float)) or not 0 <= self.max_hold_fraction <= 1:
            raise ConfigError(f"PrefetchConfig.max_hold_fraction must be in [0, 1], got "
                              f"{self.max_hold_fraction!r}")
        for name in ("timeout_base_s", "timeout_per_1k_tokens_s", "hold_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"PrefetchConfig.{name} must be a number of seconds >= 0, got {value!r}")
        for name in ("batch_pages", "max_inflight_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"PrefetchConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ControllerConfig:
    """Everything an embedded controller (and later the daemon) needs besides the layout."""

    host_pool_pages: int = 1024
    """Pages of pinned host memory (L2). Bytes = pages * layout.page_bytes."""
    eviction_policy: str = DEFAULT_POLICY
    """Which page L2 drops first when full; see ``kvstore.eviction.policy_names()``."""
    l3: L3Config = field(default_factory=L3Config)
    """The L3 store behind L2."""
    copy_backend: str | None = None
    """Copy op for L1<->L2 moves; None picks the best one for the engine's device."""
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    """How pages that are only in L3 come back up (see PrefetchConfig)."""
    prefault_host_pool: bool = False
    """Touch every page of the host pool when it is created: some hosts hand memory over
    on first touch (seconds per GiB), a cost the first stores would pay otherwise."""

    def __post_init__(self) -> None:
        if (not isinstance(self.host_pool_pages, int) or isinstance(self.host_pool_pages, bool)
                or self.host_pool_pages <= 0):
            raise ConfigError(
                f"ControllerConfig.host_pool_pages must be a positive int, got {self.host_pool_pages!r}"
            )
        if self.copy_backend is not None and self.copy_backend not in copy_backend_names():
            raise ConfigError(
                f"ControllerConfig.copy_backend {self.copy_backend!r} is unknown; use None (pick by "
                f"device) or one of {copy_backend_names()}"
            )
        if self.eviction_policy not in policy_names():
            raise ConfigError(
                f"ControllerConfig.eviction_policy {self.eviction_policy!r} is unknown; "
                f"use one of {policy_names()}"
            )
