"""KeyedCache: kvstore's L2 (+L3) addressed by page keys, for engines that keep their own pages.

``CacheClient`` takes tokens and an engine device pool of one contiguous tensor.
Engine plug-ins have neither: SGLang hands its backend page hashes and indices
into *its* host pool; vLLM keeps one KV tensor per layer. So the adapters use
this smaller, key-level API and move the bytes themselves::

    lease = cache.lookup_keys(keys)          # longest cached prefix of the chain, leased
    cache.host_tensor[lease.slots[i]]        # page keys[i], page_first [layer][kv][token][head][dim]
    cache.fence(lease).bad_positions()       # after the copy: pages whose slot changed owner
    cache.release_keys(lease)

    res = cache.begin_store_keys(keys)       # reserve slots for the absent pages
    cache.host_tensor[res.slots[i]] = ...    # write page keys[res.positions[i]]
    cache.commit_store_keys(res)             # publish (or abort_store_keys)

Keys are 16-byte digests made by the adapter inside a ``KeyNamespace`` (see
``adapters.keys``). Two implementations: ``adapters.embedded_keyed.EmbeddedKeyedCache``
(a ``CacheCore`` in this process) and ``adapters.daemon_keyed.DaemonKeyedCache`` (the daemon's
Lookup / BeginStore / CommitStore messages and its mapped shm segment).
Both are thread-safe (engines call their plug-ins from several threads).
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
