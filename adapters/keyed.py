"""Where the adapters open a ``KeyedCache`` (the page-key API, ``adapters.keyed_api``):
the mode is chosen here, above both implementations, ``adapters.embedded_keyed`` (a
``CacheCore`` in this process) and ``adapters.daemon_keyed`` (a ``kvstore serve`` daemon).
"""

from __future__ import annotations

from adapters.config import AdapterConfig
from adapters.daemon_keyed import DaemonKeyedCache
from adapters.embedded_keyed import open_shared
# The interface, importable from here as before.
from adapters.keyed_api import KeyedCache, KeyedLease, KeyedReservation, WritePages
from kvstore.layout import KVLayout

__all__ = ["KeyedCache", "KeyedLease", "KeyedReservation", "WritePages", "open_keyed_cache"]


def open_keyed_cache(config: AdapterConfig, layout: KVLayout) -> KeyedCache:
    """A handle on the cache that ``config`` names, for pages of ``layout``.

    Embedded: every handle of one ``embedded_name`` and layout in this process is one
    cache (made by the first, closed with the last). Daemon: a session of its own;
    the daemon's layout must equal ``layout``."""
    if not config.is_embedded:
        return DaemonKeyedCache(config.url, layout, request_timeout_s=config.request_timeout_s)
    return open_shared(config.embedded_name, config.controller, layout)
