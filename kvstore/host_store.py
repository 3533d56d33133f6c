"""Where ``HostStore`` used to live; it is in :mod:`kvstore.index.host_store` now."""

from kvstore.index.host_store import EvictHook, HostStore

__all__ = ["EvictHook", "HostStore"]
