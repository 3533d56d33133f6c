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
``adapters.keys``). Two implementations: ``EmbeddedKeyedCache`` (a ``CacheCore``
in this process) and ``adapters.daemon_keyed.DaemonKeyedCache`` (the daemon's
Lookup / BeginStore / CommitStore messages and its mapped shm segment).
Both are thread-safe (engines call their plug-ins from several threads).

This module holds the interface only; ``adapters.keyed`` chooses the mode
(``open_keyed_cache``) above both implementations, so neither imports the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from controller.api import CacheStats
from controller.pipelines.cost_model import CostModel
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey
from kvstore.slot_fence import SlotFence


@dataclass(frozen=True)
class KeyedLease:
    """The cached prefix of a chain of keys: ``slots[i]`` holds ``keys[i]`` until release."""

    lease_id: int
    keys: tuple[PageKey, ...]
    slots: tuple[int, ...]
    num_l2_pages: int
    num_l3_pages: int
    generations: tuple[int, ...] = ()
    """Of ``slots`` when leased: the fence checked after copying (``KeyedCache.fence``)."""

    @property
    def num_hit_pages(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class KeyedReservation:
    """Slots reserved for the absent pages of a chain: ``slots[i]`` is to receive
    ``keys[positions[i]]``; ``num_skipped`` absent pages got no slot (L2 full of
    leased pages). Nothing is visible before ``commit_store_keys``."""

    reservation_id: int
    keys: tuple[PageKey, ...]
    positions: tuple[int, ...]
    slots: tuple[int, ...]
    num_skipped: int
    generations: tuple[int, ...] = ()
    """Of ``slots`` when reserved (``KeyedCache.fence``)."""

    def stored_flags(self) -> list[bool]:
        """Per key: True if the page is surely cached after commit (present before, or
        written now). Slots go to absent pages in chain order, so the unplaced absent
        pages all come after the last placed one; when some were skipped, every key
        after it that was not placed is reported False (present ones too: a retry is cheap)."""
        flags = [True] * len(self.keys)
        if self.num_skipped:
            last = max(self.positions, default=-1)
            placed = set(self.positions)
            for i in range(last + 1, len(self.keys)):
                if i not in placed:
                    flags[i] = False
        return flags


WritePages = Callable[[Sequence[int], Sequence[int]], None]
"""(positions, slots) -> write page ``keys[positions[i]]`` into ``host_tensor[slots[i]]``."""


class KeyedCache(ABC):
    """Page-key access to one layout's L2 slots (and the L3 behind them). Thread-safe."""

    layout: KVLayout
    """The cached pages' layout, ``page_first`` (the arrangement of ``host_tensor``)."""

    @property
    @abstractmethod
    def host_tensor(self) -> torch.Tensor:
        """The L2 slots, shape ``layout.pool_shape(num_slots)``; read only leased slots,
        write only reserved ones."""

    @property
    @abstractmethod
    def generations(self) -> np.ndarray:
        """The live per-slot generations of the L2 pool (``kvstore.slot_fence``)."""

    def fence(self, held: "KeyedLease | KeyedReservation") -> SlotFence:
        """The fence of a lease's or a reservation's slots. Check ``bad_positions()``
        after a copy has completed: a position listed there lost its slot to another
        writer during the copy, so its bytes cannot be trusted (a load error: recompute
        from the first one; a store: do not commit)."""
        return SlotFence(self.generations, held.slots, held.generations)

    @abstractmethod
    def lookup_keys(self, keys: Sequence[PageKey]) -> KeyedLease:
        """Lease the longest cached prefix of ``keys`` (a chain: key i follows key i-1).
        Pages only in L3 are read into L2 first. The caller must ``release_keys``."""

    @abstractmethod
    def release_keys(self, lease: KeyedLease) -> None:
        """End the lease; its slots may be reused at once. Idempotent."""

    @abstractmethod
    def begin_store_keys(self, keys: Sequence[PageKey]) -> KeyedReservation:
        """Reserve slots for the pages of ``keys`` that L2 lacks (present ones count as hits)."""

    @abstractmethod
    def commit_store_keys(self, reservation: KeyedReservation) -> int:
        """Publish the written slots; returns how many pages became visible."""

    @abstractmethod
    def abort_store_keys(self, reservation: KeyedReservation) -> None:
        """Give the reserved slots back unpublished."""

    @abstractmethod
    def stats(self) -> CacheStats:
        """Counters of the cache (the daemon's are shared by all of its clients)."""

    @abstractmethod
    def close(self) -> None:
        """Release what this handle holds. Idempotent."""

    def check_fresh(self) -> None:
        """Raise CacheError if leases or reservations may have been reclaimed (a daemon
        drops those of silent clients); call before copying. Embedded: never."""

    def report_prefill(self, num_tokens: int, num_cached: int, seconds: float,
                       load_wait_s: float = 0.0) -> None:
        """The engine computed ``num_tokens`` prompt tokens over a prefix of ``num_cached``
        in ``seconds`` (``CacheClient.report_prefill``): the ``auto`` policy of the cache
        behind this handle weighs loads and waits against this rate. The adapters call it
        from the engine's loop (vLLM: the worker measures, the scheduler side reports)."""
        cost = self._cost_model()
        if cost is None:
            return
        cost.observe_prefill(num_tokens, num_cached, seconds)
        if num_cached and load_wait_s >= 0:
            cost.observe_l2_load(num_cached // self.layout.page_size * self.layout.page_bytes, load_wait_s)

    def _cost_model(self) -> "CostModel | None":
        """The cost model whose ``auto`` choices this handle's lookups follow."""
        return None

    # ---- helpers built on the calls above ----------------------------------------------
    def num_intact_pages(self, lease: KeyedLease) -> int:
        """After copying a lease's pages out: how many leading pages are surely the
        committed bytes (the rest lost a slot to another writer during the copy, so the
        engine must treat them as misses and recompute them)."""
        bad = self.fence(lease).bad_positions()
        return bad[0] if bad else lease.num_hit_pages

    def count_cached(self, keys: Sequence[PageKey]) -> int:
        """Length of the cached prefix of ``keys`` (L3 pages are brought up to L2)."""
        lease = self.lookup_keys(keys)
        self.release_keys(lease)
        return lease.num_hit_pages

    def store_keys(self, keys: Sequence[PageKey], write: WritePages) -> KeyedReservation:
        """Reserve, ``write(positions, slots)``, commit (abort if ``write`` raises)."""
        reservation = self.begin_store_keys(keys)
        if reservation.slots:
            try:
                self.check_fresh()
                write(reservation.positions, reservation.slots)
                self.check_fresh()
            except BaseException:
                self.abort_store_keys(reservation)
                raise
        self.commit_store_keys(reservation)
        return reservation
