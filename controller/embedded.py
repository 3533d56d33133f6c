"""EmbeddedController: the whole cache in the engine's process (no daemon).

A ``CacheCore`` (L2 in shm, L3, write policy) plus the engine's ``DevicePool``
(page checks, L1<->L2 copies) behind the CacheClient API. Data paths::

    store:   device pool --copy op--> reserved L2 slots --commit--> visible (--put--> L3)
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
from controller.config import ControllerConfig
from controller.core import CacheCore, FlushReport
from controller.device_pool import DevicePool
from controller.leases import LeaseBook
from controller.pipelines.prefetch import CompletedPrefetch
from kvstore.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, page_keys


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
        self._leases = LeaseBook()
        self._lease_ids = itertools.count(1)
        self._core = CacheCore(config, self.layout)

    @property
    def host_store(self) -> HostStore:
        return self._core.host

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        self._core.check_open()
        keys = page_keys(self._ns_digest, tokens, self.layout.page_size)
        hit = self._core.lookup(keys)
        result = LookupResult(next(self._lease_ids), tuple(keys[: hit.num_l2 + hit.num_l3]),
                              self.layout.page_size, hit.num_l2, hit.num_l3, hit.num_pending)
        self._leases.add(result)
        return result

    def prefetch(self, tokens: Sequence[int] | np.ndarray) -> PrefetchTicket:
        self._core.check_open()
        ticket = self._core.prefetch(page_keys(self._ns_digest, tokens, self.layout.page_size))
        return ticket if ticket is not None else CompletedPrefetch()

    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        self._core.check_open()
        self._leases.require(result, "load")
        pages = self._device.check_pages(device_pages, "load() device_pages")
        if len(pages) != result.num_hit_pages:
            raise CacheError(
                f"load() needs one device page per hit page: got {len(pages)} "
                f"for {result.num_hit_pages} hit pages"
            )
        handle = self._device.load(self._core.pool, self._core.slots_of(result.keys), pages)
        self._leases.add_load(result.lease_id, handle)
        return handle

    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        self._core.check_open()
        keys = page_keys(self._ns_digest, tokens, self.layout.page_size)
        pages = self._device.check_pages(device_pages, "store() device_pages")
        if len(pages) < len(keys):
            raise CacheError(
                f"store() got {len(pages)} device pages for {len(keys)} full pages of tokens; "
                f"page i holds tokens [i*{self.layout.page_size}, (i+1)*{self.layout.page_size})"
            )
        plan = self._core.begin_store(keys)
        if plan.slots:
            try:
                self._device.save([pages[i] for i in plan.positions], self._core.pool, plan.slots)
            except BaseException:
                self._core.abort_store(plan)
                raise
        num_new = self._core.commit_store(keys, plan)
        return StoreResult(len(keys), num_new, plan.num_skipped)

    def release(self, result: LookupResult) -> None:
        self._core.check_open()
        held = self._leases.take(result)
        if held is not None:
            self._core.release(held.keys)

    def stats(self) -> CacheStats:
        self._core.check_open()
        return self._core.stats()

    def drain_backups(self, timeout_s: float = 30.0) -> bool:
        """Wait until every page queued for L3 was written (or failed); False on timeout.
        Writes to L3 run in the background, so tests and orderly hand-offs use this."""
        self._core.check_open()
        return self._core.drain_backups(timeout_s)

    def check_integrity(self, quiescent: bool = False) -> None:
        """Raise if L2's pool, index and leases disagree (``quiescent``: and nothing is held)."""
        self._core.check_integrity(quiescent)

    def close(self) -> FlushReport:
        """Release every lease, write due pages to L3 (see ``CacheClient.close``), close
        L3 and remove the host pool; returns what the flush wrote. Idempotent."""
        if self._core.is_closed:
            return FlushReport()
        try:
            for result in self._leases.results():
                self.release(result)
        finally:
            report = self._core.close()
        return report
