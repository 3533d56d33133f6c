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


class LoadError(CacheError):
    """A load could not vouch for the bytes of some of its pages: their host slots
    changed owner before the copy ended (the client's session was lost while it was
    paused, say), or the copy failed. The device pages of ``bad_pages`` (indices into
    the lookup result's ``keys`` and the load's ``device_pages``) may hold wrong KV.

    The engine recovers by treating the hit as ending at ``first_bad_page``: pages
    before it are good; it recomputes the rest. Never ignore it: the bytes are wrong."""

    def __init__(self, message: str, bad_pages: Sequence[int]) -> None:
        super().__init__(message)
        if not bad_pages:
            raise ValueError("LoadError needs at least one bad page")
        self.bad_pages: tuple[int, ...] = tuple(sorted(set(int(i) for i in bad_pages)))

    @property
    def first_bad_page(self) -> int:
        """Hit pages before this index are good; this one and every later one are recomputed."""
        return self.bad_pages[0]


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
    num_pending_pages: int = 0
    """Pages after the hit that a prefetch is still reading from L3 when this returned
    (``best_effort`` and ``timeout``): a later lookup may find them in L2."""

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

    A failed load is never silent: ``wait_layer``, ``wait_all`` and ``verify`` raise
    ``LoadError`` naming the pages that cannot be trusted, and the engine recomputes
    from the first of them (see ``LoadError``).
    """

    @abstractmethod
    def wait_layer(self, layer: int) -> None:
        """Block until layer ``layer`` of every loaded page is in the device pool."""

    @abstractmethod
    def wait_all(self) -> None:
        """Make every layer readable by the engine (as wait_layer does for one)."""

    def verify(self) -> None:
        """Block until every layer has been copied, then raise LoadError if any loaded
        page may not hold its committed bytes. Engines call it before they trust what
        they computed from the loaded KV (sampled tokens, stored pages): ``wait_layer``
        raises LoadError only for what is known by then, and on CUDA the copy of a layer
        is still running when its wait returns. Raises CacheError after ``release``."""
        self.wait_all()


class PrefetchTicket(ABC):
    """Progress of one background read of L3 pages into L2 (``CacheClient.prefetch``, or
    the one a lookup starts). Pages arrive in chain order; only the contiguous ready
    prefix is of use, so reading stops at the first page L3 does not return.
    Ready pages are ordinary L2 pages: a lookup finds them (it does not need the ticket)."""

    @property
    @abstractmethod
    def num_pages(self) -> int:
        """Pages L3 said it holds (after the existence check; 0 before)."""

    @property
    @abstractmethod
    def num_ready(self) -> int:
        """Pages read into L2 so far (a contiguous run from where the prefetch started)."""

    @property
    @abstractmethod
    def num_failed(self) -> int:
        """Pages that L3 listed but did not return (miss, corrupt, error) or that were cancelled."""

    @property
    def num_pending(self) -> int:
        """Pages still being read."""
        return max(0, self.num_pages - self.num_ready - self.num_failed)

    @property
    @abstractmethod
    def is_done(self) -> bool:
        """True once nothing more will arrive (finished, failed or cancelled)."""

    @abstractmethod
    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until done or ``timeout_s`` passed; returns ``is_done``."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop reading; returns once no read writes into a reserved slot any more."""


class CacheClient(ABC):
    """An engine's handle on the cache. Not thread-safe: one engine thread calls it."""

    layout: KVLayout

    @abstractmethod
    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        """Find the longest cached prefix of ``tokens`` (whole pages only) and lease it.

        Pages found only in L3 are read into L2 by a prefetch (which may evict other,
        unleased L2 pages); how long this waits for them is the prefetch policy's
        choice (``PrefetchConfig.policy``): ``wait_complete`` (the default) and ``sync``
        until they are in, ``timeout`` up to a budget, ``best_effort`` not at all.
        Takes a lease that the caller must end with ``release``.
        """

    def prefetch(self, tokens: Sequence[int] | np.ndarray) -> PrefetchTicket:
        """Start reading the pages of ``tokens`` that are in L3 but not in L2, in the
        background (a hint, e.g. for an agent session that will come back after a tool
        call). Never waits on L3 and takes no lease."""
        raise CacheError(f"{type(self).__name__} does not prefetch")

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
    layout, another size, another encoding): misses, never served."""
    num_l2_pages: int = 0
    """Pages in L2 now."""
    num_due_pages: int = 0
    """Pages in L2 not yet written to L3 now (what close() would write)."""
    num_backup_queue_pages: int = 0
    """Pages waiting in (or being written by) the backup queue now."""
    backup_queue_bytes: int = 0
    """Bytes of evicted pages held in the backup queue now (bounded by L3Config.backup_queue_bytes)."""
    backup_lag_s: float = 0.0
    """Age of the oldest page waiting in the backup queue now."""
    num_prefetch_held_pages: int = 0
    """Pages finished prefetches hold (leased) for the requests they were started for now."""
    l3_bytes_read: int = 0
    """Framed bytes read from L3 (prefetches and lookups)."""
    l3_bytes_written: int = 0
    """Framed bytes written to L3 (with ``L3Config.encoding="fp8_e4m3"`` about half of
    ``l3_page_bytes_written``)."""
    l3_page_bytes_written: int = 0
    """Bytes of the pages those L3 writes hold, as L2 holds them."""
