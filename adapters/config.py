"""AdapterConfig: where an engine plug-in finds its cache, parsed from the engine's JSON.

Both engines pass plug-ins a free-form dict (SGLang's
``--hicache-storage-backend-extra-config``, vLLM's ``kv_connector_extra_config``);
the keys below are read from it, every other key is left to the engine::

    {"kvstore_url": "ipc:///run/kvstore/kvstore.sock"}            # the node's daemon
    {"kvstore_url": "embedded", "kvstore_host_pool_pages": 4096,  # in-process cache
     "kvstore_l3": {"connector": "disk", "options": {"path": "/var/cache/kvstore"}}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from controller.config import ConfigError, ControllerConfig, L3Config
from controller.daemon.address import AddressError, parse_address

EMBEDDED = "embedded"
_KEYS = ("kvstore_url", "kvstore_host_pool_pages", "kvstore_eviction_policy", "kvstore_l3",
         "kvstore_embedded_name", "kvstore_request_timeout_s", "kvstore_model_id",
         "kvstore_cache_salt")


@dataclass(frozen=True)
class AdapterConfig:
    """Where the cache is and, for an embedded one, how it is built."""

    url: str = EMBEDDED
    """``"embedded"`` (the cache lives in this process) or the daemon's address
    (``ipc://...`` or ``tcp://...``, as given to ``kvstore serve``)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """Host pool size, eviction policy and L3 of an embedded cache (a daemon has its own)."""
    embedded_name: str = "default"
    """Embedded caches of one name and layout are one cache within a process (so a
    vLLM scheduler and worker in one process, or two test 'ranks', share pages)."""
    request_timeout_s: float = 10.0
    """Daemon only: longest wait for one reply."""
    model_id: str | None = None
    """Overrides the model name the engine reports (it goes into every page key)."""
    cache_salt: str | None = None
    """Pages stored under one salt are never served under another (tenant isolation)."""

    def __post_init__(self) -> None:
        if self.url != EMBEDDED:
            try:
                parse_address(self.url)
            except AddressError as exc:
                raise ConfigError(f"kvstore_url must be 'embedded' or a daemon address, as given "
                                  f"to `kvstore serve`: {exc}") from None
        if self.request_timeout_s <= 0:
            raise ConfigError(f"kvstore_request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def is_embedded(self) -> bool:
        return self.url == EMBEDDED

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> "AdapterConfig":
        """Read the ``kvstore_*`` keys of an engine's extra-config dict (others are ignored)."""
        extra = dict(extra or {})
        l3 = extra.get("kvstore_l3") or {}
        if not isinstance(l3, Mapping):
            raise ConfigError(f"kvstore_l3 must be an object like {{\"connector\": \"disk\", "
                              f"\"options\": {{...}}}}, got {l3!r}")
        controller = ControllerConfig(
            host_pool_pages=int(extra.get("kvstore_host_pool_pages", 1024)),
            eviction_policy=extra.get("kvstore_eviction_policy", ControllerConfig().eviction_policy),
            l3=L3Config(**l3),
        )
        return cls(
            url=extra.get("kvstore_url", EMBEDDED),
            controller=controller,
            embedded_name=str(extra.get("kvstore_embedded_name", "default")),
            request_timeout_s=float(extra.get("kvstore_request_timeout_s", 10.0)),
            model_id=extra.get("kvstore_model_id"),
            cache_salt=extra.get("kvstore_cache_salt"),
        )
