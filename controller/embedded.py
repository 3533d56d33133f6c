"""EmbeddedController: the whole cache in the engine's process (no daemon).

A ``CacheCore`` (L2 in shm, L3, write policy) plus the engine's ``DevicePool``
(page checks, L1<->L2 copies) behind the CacheClient API. Data paths::

    store:   device pool --copy op--> reserved L2 slots --commit--> visible (--put--> L3)
             (on CUDA the copy runs behind the call; the pages are committed by the first
             call that finds it complete, or by close)
    evict:   L2 slot --put--> L3 (when the page is due) --> slot freed
    lookup:  L2 match, then L3 exists + get_into free L2 slots (pages come back up)
    load:    L2 slot --copy op--> device pool, layer by layer
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from controller.api import (CacheClient, CacheError, CacheStats, LoadHandle, LookupResult,
                            PrefetchTicket, StoreResult)
from controller.arguments import token_array
from controller.config import ControllerConfig
from controller.core import CacheCore, FlushReport
from controller.device_pool import DevicePool
from controller.pending_stores import PendingStore, PendingStores
from controller.leases import LeaseBook
from controller.pipelines.cost_model import worth_waiting_s
from controller.pipelines.prefetch import CompletedPrefetch, Prefetch
from kvstore.index.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, PageKey, PageKeyCache
from kvstore.slot_fence import SlotFence


class EmbeddedController(CacheClient):
    def __init__(
        self,
        config: ControllerConfig,
        namespace: KeyNamespace,
        device_pool: torch.Tensor,
    ) -> None:
        self.config = config
        self.layout: KVLayout = namespace.layout
        self._device = DevicePool(self.layout, device_pool, config.copy_backend)
        self._ns_digest = namespace.digest()
        # A next turn resends the last prompt: only its new pages are hashed.
        self._key_cache = PageKeyCache(self.layout.page_size)
        self._leases = LeaseBook()
        self._lease_ids = itertools.count(1)
        self._core = CacheCore(config, self.layout)
        self._pending = PendingStores(
            lambda store: self._core.commit_store(store.keys, store.plan),
            lambda store: self._core.abort_store(store.plan))

    def _keys(self, tokens: Sequence[int] | np.ndarray) -> list[PageKey]:
        return self._key_cache.keys(self._ns_digest, token_array(tokens))

    @property
    def host_store(self) -> HostStore:
        return self._core.host

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        tokens = token_array(tokens)
        self._commit_stores(tokens=tokens)
        self._core.check_open()
        keys = self._keys(tokens)
        hit = self._core.lookup(keys)
        result = LookupResult(next(self._lease_ids), tuple(keys[: hit.num_l2 + hit.num_l3]),
                              self.layout.page_size, hit.num_l2, hit.num_l3, hit.num_pending)
        self._leases.add(result)
        return result

    def prefetch(self, tokens: Sequence[int] | np.ndarray) -> PrefetchTicket:
        self._core.check_open()
        ticket = self._core.prefetch(self._keys(tokens))
        return ticket if ticket is not None else CompletedPrefetch()

    def report_prefill(self, num_tokens: int, num_cached: int, seconds: float,
                       load_wait_s: float = 0.0) -> None:
        cost = self._core.cost
        cost.observe_prefill(num_tokens, num_cached, seconds)
        if num_cached:
            cost.observe_l2_load(num_cached // self.layout.page_size * self.layout.page_bytes, load_wait_s)

    def worth_waiting_s(self, ticket: PrefetchTicket, num_tokens: int, waited_s: float = 0.0) -> float:
        if ticket.is_done or not isinstance(ticket, Prefetch):
            return 0.0
        wait_s = worth_waiting_s(self._core.cost, num_tokens, ticket.start + ticket.num_ready,
                                 ticket.num_pending, ticket.is_checking, waited_s)
        ticket.is_waited_out = wait_s <= 0   # the lookup that follows does not wait again
        return wait_s

    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        self._core.check_open()
        self._commit_stores()
        self._leases.require(result, "load")
        pages = self._device.check_pages(device_pages, "load() device_pages")
        if len(pages) != result.num_hit_pages:
            raise CacheError(
                f"load() needs one device page per hit page: got {len(pages)} "
                f"for {result.num_hit_pages} hit pages"
            )
        slots = self._core.slots_of(result.keys)
        # Leased slots can't change owner in-process; the fence costs one compare and
        # keeps one code path for both modes.
        fence = SlotFence.current(self._core.pool.generations, slots)
        handle = self._device.load(self._core.pool, slots, pages, fence)
        self._leases.add_load(result.lease_id, handle)
        return handle

    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        """See ``CacheClient.store``. On CUDA this returns after planning and enqueueing the
        copy; the new pages become visible to lookups once it has completed (the engine
        may reuse its pages at once: ``DevicePool.start_save``). ``num_new_pages`` counts
        the pages being written (a concurrent store of the same pages may publish first)."""
        self._core.check_open()
        self._commit_stores()
        keys = self._keys(tokens)
        pages = self._device.check_pages(device_pages, "store() device_pages")
        if len(pages) < len(keys):
            raise CacheError(
                f"store() got {len(pages)} device pages for {len(keys)} full pages of tokens; "
                f"page i holds tokens [i*{self.layout.page_size}, (i+1)*{self.layout.page_size})"
            )
        plan = self._core.begin_store(keys)
        if not plan.slots:
            return StoreResult(len(keys), self._core.commit_store(keys, plan), plan.num_skipped)
        try:
            copy = self._device.start_save([pages[i] for i in plan.positions], self._core.pool, plan.slots)
        except BaseException:
            self._core.abort_store(plan)
            raise
        if copy.is_done():  # synchronous (CPU)
            return StoreResult(len(keys), self._core.commit_store(keys, plan), plan.num_skipped)
        self._pending.add(PendingStore(keys, plan, copy))
        return StoreResult(len(keys), len(plan.slots), plan.num_skipped)

    def _commit_stores(self, wait: bool = False, tokens: Sequence[int] | np.ndarray | None = None) -> None:
        """Publish the stores whose copies have completed (``PendingStores.publish_done``);
        ``tokens`` (a lookup's): wait for the stores holding a page of them."""
        if not len(self._pending):
            return
        wanted = None if tokens is None else self._keys(tokens)
        self._pending.publish_done(wait, wanted)

    @property
    def num_pending_stores(self) -> int:
        """Stores whose copies were in flight at the last call (their pages not yet visible)."""
        return len(self._pending)

    def release(self, result: LookupResult) -> None:
        self._core.check_open()
        held = self._leases.take(result)
        if held is not None:
            self._core.release(held.keys)

    def stats(self) -> CacheStats:
        self._core.check_open()
        self._commit_stores()
        return self._core.stats()

    def drain_backups(self, timeout_s: float = 30.0) -> bool:
        """Wait until every page queued for L3 was written (or failed); False on timeout.
        Writes to L3 run in the background, so tests and orderly hand-offs use this."""
        self._core.check_open()
        return self._core.drain_backups(timeout_s)

    def check_integrity(self, quiescent: bool = False) -> None:
        """Raise if L2's pool, index and leases disagree (``quiescent``: and nothing is held,
        after waiting for the stores in flight)."""
        if not self._core.is_closed:
            self._commit_stores(wait=quiescent)
        self._core.check_integrity(quiescent)

    def close(self) -> FlushReport:
        """Release every lease, write due pages to L3 (see ``CacheClient.close``), close
        L3 and remove the host pool; returns what the flush wrote. Idempotent."""
        if self._core.is_closed:
            return FlushReport()
        try:
            for result in self._leases.results():
                self.release(result)
            self._commit_stores(wait=True)  # before the flush, so they reach L3 too
        finally:
            try:
                self._device.close()
            finally:
                report = self._core.close()
        return report
