"""EmbeddedKeyedCache: ``KeyedCache`` over a ``CacheCore`` in this process.

Handles of one ``embedded_name`` and layout share one cache (``open_shared``):
made by the first, closed with the last.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from adapters.keyed_api import KeyedCache, KeyedLease, KeyedReservation
from controller.api import CacheError, CacheStats
from controller.config import ControllerConfig
from controller.core import CacheCore, StorePlan
from controller.pipelines.cost_model import CostModel
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey


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


def open_shared(name: str, config: ControllerConfig, layout: KVLayout) -> KeyedCache:
    """A handle on the embedded cache ``name`` of ``layout`` in this process (made now
    if no handle holds it)."""
    key = (name, layout.fingerprint())
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = _Shared(key, EmbeddedKeyedCache(config, layout))
        entry.num_handles += 1
        return _SharedHandle(entry)
