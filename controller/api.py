"""The client-facing cache API: what an engine calls, in-process or against the daemon.

An engine's request goes through the cache in four steps::

    result = cache.lookup(tokens)                 # longest cached prefix; leases its pages
    handle = cache.load(result, device_pages)     # L2 -> engine pool, layer by layer
    for layer in range(num_layers):
        handle.wait_layer(layer)                  # just before that layer's attention
        ...
    cache.store(tokens, device_pages)             # new full pages go down to L2 (and L3)
    cache.release(result)                         # ends the lease taken by lookup

The same abstract class is served by the embedded controller (no daemon) and
by the daemon's client library, so engines are written once. Every call on a
closed client raises CacheError.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey


class CacheError(RuntimeError):
    """A cache operation was refused; the message says why and what to do."""


@dataclass(frozen=True)
class LookupResult:
    """The cached prefix of one token sequence, leased until ``release``.

    Of the ``keys``, ``num_l2_pages`` were in host memory (L2) when looked up and
    ``num_l3_pages`` were only in an L3 store and have been brought into L2 by
    the lookup. Either way every page in ``keys`` stays readable until release.
    """

    lease_id: int
    keys: tuple[PageKey, ...]
    page_size: int
    num_l2_pages: int
    num_l3_pages: int

    @property
    def num_hit_pages(self) -> int:
        return len(self.keys)

    @property
    def num_hit_tokens(self) -> int:
        return len(self.keys) * self.page_size


@dataclass(frozen=True)
class StoreResult:
    """What a ``store`` call added."""

    num_pages: int
    """Full pages in the stored tokens."""
    num_new_pages: int
    """Pages that were not cached before and were written to L2."""
    num_skipped_pages: int = 0
    """Pages that could not be placed (host pool full of leased pages); never an error."""


class LoadHandle(ABC):
    """Progress of one load into the engine's device pool.

    Pages are readable in the device pool at layer ``i`` only after
    ``wait_layer(i)`` returns. Waits are valid only while the lease of the
    lookup is held: after ``release`` they raise CacheError.
    """

    @abstractmethod
    def wait_layer(self, layer: int) -> None:
        """Block until layer ``layer`` of every loaded page is in the device pool."""

    @abstractmethod
    def wait_all(self) -> None:
        """Make every layer readable by the engine (as wait_layer does for one)."""


class CacheClient(ABC):
    """An engine's handle on the cache. Not thread-safe: one engine thread calls it."""

    layout: KVLayout

    @abstractmethod
    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        """Find the longest cached prefix of ``tokens`` (whole pages only) and lease it.

        Pages found only in L3 are read into L2 before this returns (which may
        evict other, unleased L2 pages). Takes a lease that the caller must end
        with ``release``.
        """

    @abstractmethod
    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        """Copy the leased pages of ``result`` into the engine pool.

        ``device_pages[i]`` receives ``result.keys[i]``; it must have exactly
        ``result.num_hit_pages`` entries. Raises CacheError if the lease has ended.
        """

    @abstractmethod
    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        """Cache the full pages of ``tokens`` whose KV sits in ``device_pages``.

        ``device_pages[i]`` is the engine-pool page holding tokens ``[i*P, (i+1)*P)``
        (P = ``layout.page_size``); there must be one per full page (extra entries,
        e.g. the partial last page's, are ignored). Pages already cached are not
        copied again. Device page ids must be distinct ints inside the pool, else
        CacheError, before anything is copied.
        """

    @abstractmethod
    def release(self, result: LookupResult) -> None:
        """End the lease of ``result``; its pages become evictable again. Idempotent."""

    @abstractmethod
    def stats(self) -> "CacheStats":
        """A snapshot of this cache's counters (hits per tier, L3 writes, errors)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything this client holds and stop its background work.

        With an L3 store, pages not yet written there (write_back) are written
        first, within ``L3Config.close_flush_s``; how many could not be is logged
        and counted in ``stats().num_l3_dropped_pages``. Idempotent."""

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class CacheStats:
    """Counters of one cache since it started (a snapshot; safe to keep)."""

    num_lookups: int = 0
    num_lookup_pages: int = 0
    """Full pages asked for by lookups; misses = this - L2 hits - L3 hits."""
    num_l2_hit_pages: int = 0
    num_l3_hit_pages: int = 0
    """Pages found only in L3 and brought back into L2 by a lookup."""
    num_stored_pages: int = 0
    """Pages written into L2 by stores."""
    num_evicted_pages: int = 0
    num_l3_written_pages: int = 0
    """Pages written to L3 (write_through, eviction under write_back, close)."""
    num_l3_dropped_pages: int = 0
    """Pages due to L3 that left L2 without being written there (L3 refused or failed)."""
    num_l3_errors: int = 0
    """L3 calls that failed or timed out (each one a miss or a dropped write)."""
    num_l3_bad_values: int = 0
    """L3 values read back that failed their checks (corrupt, under another key, another
    layout, another size): misses, never served."""
    num_l2_pages: int = 0
    """Pages in L2 now."""
    num_due_pages: int = 0
    """Pages in L2 not yet written to L3 now (what close() would write)."""
