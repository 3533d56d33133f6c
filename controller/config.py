"""Controller configuration: frozen dataclasses, one docstring per field, checked on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping

from kvstore.copy_ops import copy_backend_names
from kvstore.eviction import DEFAULT_POLICY, policy_names

WritePolicy = Literal["write_back", "write_through"]
WRITE_POLICIES: tuple[str, ...] = ("write_back", "write_through")


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and how to fix it."""


@dataclass(frozen=True)
class L3Config:
    """Which L3 store backs the host pool, if any."""

    connector: str | None = None
    """Connector name ("disk", "redis", "redis_cluster", "mooncake", "memory"), or None for no L3."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Connector options, e.g. {"path": "/var/cache/kvstore", "capacity_bytes": 64 << 30}."""
    write_policy: WritePolicy = "write_back"
    """``write_back``: a page goes to L3 when L2 evicts it. ``write_through``: every new
    page goes to L3 as soon as it is stored in L2."""
    timeout_s: float = 30.0
    """Longest wait for one batched L3 call before it counts as failed."""
    close_flush_s: float = 60.0
    """At close (and daemon shutdown), how long to spend writing the pages that L3
    does not hold yet (write_back keeps them in L2 only); 0 writes none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.write_policy not in WRITE_POLICIES:
            raise ConfigError(
                f"L3Config.write_policy {self.write_policy!r} is unknown; use one of {WRITE_POLICIES}"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"L3Config.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if not isinstance(self.close_flush_s, (int, float)) or self.close_flush_s < 0:
            raise ConfigError(f"L3Config.close_flush_s must be >= 0 seconds, got {self.close_flush_s!r}")


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
