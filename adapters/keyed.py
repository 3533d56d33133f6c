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
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from adapters.config import AdapterConfig
from controller.api import CacheError, CacheStats
from controller.config import ControllerConfig
from controller.core import CacheCore, StorePlan
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


class EmbeddedKeyedCache(KeyedCache):
    """A ``CacheCore`` in this process behind a lock. Get one with ``open_keyed_cache``
    so that handles of one name and layout share it."""

    def __init__(self, config: ControllerConfig, layout: KVLayout) -> None:
        self.layout = layout.with_arrangement("page_first")
        self._core = CacheCore(config, self.layout)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._leases: dict[int, KeyedLease] = {}
        self._plans: dict[int, StorePlan] = {}

    @property
    def host_tensor(self) -> torch.Tensor:
        return self._core.pool.tensor

    @property
    def generations(self) -> np.ndarray:
        return self._core.pool.generations

    @property
    def core(self) -> CacheCore:
        return self._core

    def _cost_model(self) -> CostModel:
        return self._core.cost

    def lookup_keys(self, keys: Sequence[PageKey]) -> KeyedLease:
        keys = list(keys)
        with self._lock:
            num_l2, num_l3, _, _ = self._core.lookup(keys)
            hit = tuple(keys[: num_l2 + num_l3])
            slots = self._core.slots_of(hit)
            lease = KeyedLease(next(self._ids), hit, tuple(slots), num_l2, num_l3,
                               tuple(self._core.pool.generations[slots].tolist()))
            if hit:
                self._leases[lease.lease_id] = lease
        return lease

    def release_keys(self, lease: KeyedLease) -> None:
        with self._lock:
            if self._leases.pop(lease.lease_id, None) is not None and not self._core.is_closed:
                self._core.release(lease.keys)

    def begin_store_keys(self, keys: Sequence[PageKey]) -> KeyedReservation:
        keys = tuple(keys)
        with self._lock:
            plan = self._core.begin_store(keys)
            res = KeyedReservation(next(self._ids), keys, plan.positions, plan.slots, plan.num_skipped,
                                   tuple(self._core.pool.generations[list(plan.slots)].tolist()))
            self._plans[res.reservation_id] = plan
        return res

    def commit_store_keys(self, reservation: KeyedReservation) -> int:
        with self._lock:
            plan = self._take_plan(reservation)
            return self._core.commit_store(list(reservation.keys), plan)

    def abort_store_keys(self, reservation: KeyedReservation) -> None:
        with self._lock:
            plan = self._plans.pop(reservation.reservation_id, None)
            if plan is not None and not self._core.is_closed:
                self._core.abort_store(plan)

    def _take_plan(self, reservation: KeyedReservation) -> StorePlan:
        plan = self._plans.pop(reservation.reservation_id, None)
        if plan is None:
            raise CacheError(f"reservation {reservation.reservation_id} was committed or aborted "
                             "already; begin_store_keys() again")
        return plan

    def stats(self) -> CacheStats:
        with self._lock:
            self._core.check_open()
            return self._core.stats()

    def check_integrity(self, quiescent: bool = False) -> None:
        with self._lock:
            self._core.check_integrity(quiescent)

    def close(self) -> None:
        """Abort open reservations, end leases, flush due pages to L3 and free the pool."""
        with self._lock:
            if self._core.is_closed:
                return
            for plan in self._plans.values():
                self._core.abort_store(plan)
            for lease in self._leases.values():
                self._core.release(lease.keys)
            self._plans.clear()
            self._leases.clear()
            self._core.close()


class _SharedHandle(KeyedCache):
    """One user's handle on a shared embedded cache: closing it closes the cache only
    when the last handle goes."""

    def __init__(self, entry: "_Shared") -> None:
        self._entry = entry
        self._is_closed = False
        self.layout = entry.cache.layout

    def _cache(self) -> EmbeddedKeyedCache:
        if self._is_closed:
            raise CacheError("this cache handle is closed; open_keyed_cache() again")
        return self._entry.cache

    @property
    def host_tensor(self) -> torch.Tensor:
        return self._cache().host_tensor

    @property
    def generations(self) -> np.ndarray:
        return self._cache().generations

    @property
    def embedded(self) -> EmbeddedKeyedCache:
        return self._cache()

    def lookup_keys(self, keys):
        return self._cache().lookup_keys(keys)

    def release_keys(self, lease):
        if not self._is_closed:
            self._entry.cache.release_keys(lease)

    def begin_store_keys(self, keys):
        return self._cache().begin_store_keys(keys)

    def commit_store_keys(self, reservation):
        return self._cache().commit_store_keys(reservation)

    def abort_store_keys(self, reservation):
        self._cache().abort_store_keys(reservation)

    def stats(self):
        return self._cache().stats()

    def _cost_model(self) -> CostModel:
        return self._cache().core.cost

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        _release_shared(self._entry)


@dataclass
class _Shared:
    key: tuple[str, str]
    cache: EmbeddedKeyedCache
    num_handles: int = 0


_shared: dict[tuple[str, str], _Shared] = {}
_shared_lock = threading.Lock()


def _release_shared(entry: _Shared) -> None:
    with _shared_lock:
        entry.num_handles -= 1
        if entry.num_handles > 0:
            return
        _shared.pop(entry.key, None)
    entry.cache.close()


def open_keyed_cache(config: AdapterConfig, layout: KVLayout) -> KeyedCache:
    """A handle on the cache that ``config`` names, for pages of ``layout``.

    Embedded: every handle of one ``embedded_name`` and layout in this process is one
    cache (made by the first, closed with the last). Daemon: a session of its own;
    the daemon's layout must equal ``layout``."""
    if not config.is_embedded:
        from adapters.daemon_keyed import DaemonKeyedCache

        return DaemonKeyedCache(config.url, layout, request_timeout_s=config.request_timeout_s)
    key = (config.embedded_name, layout.fingerprint())
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = _Shared(key, EmbeddedKeyedCache(config.controller, layout))
        entry.num_handles += 1
        return _SharedHandle(entry)
