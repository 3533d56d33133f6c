"""EmbeddedController: the whole cache in the engine's process (no daemon).

It owns the L2 host store and the L3 connector, and implements CacheClient for
one engine's device pool. Data paths::

    store:   device pool --copy op--> L2 slot (--put--> L3 when write_through)
    evict:   L2 slot --put--> L3 (write_back) --> slot freed
    lookup:  L2 match, then L3 exists + get_into free L2 slots (pages come back up)
    load:    L2 slot --copy op--> device pool, layer by layer
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
import torch

from controller.api import CacheClient, CacheError, CacheStats, LoadHandle, LookupResult, StoreResult
from controller.async_runner import AsyncRunner
from controller.config import ControllerConfig
from controller.load_handle import CompletedLoad, ControllerLoad, CudaStreamLoad, LazyLayerLoad
from kvstore.copy_ops import copy_backend_for
from kvstore.host_pool import HostPool
from kvstore.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, PageKey, page_keys

log = logging.getLogger(__name__)


class EmbeddedController(CacheClient):
    def __init__(
        self,
        config: ControllerConfig,
        namespace: KeyNamespace,
        device_pool: torch.Tensor,
    ) -> None:
        self.config = config
        self.layout: KVLayout = namespace.layout
        self.layout.check_pool(device_pool, "device pool")
        self._device_pool = device_pool
        self._ns_digest = namespace.digest()
        self._copy = copy_backend_for(device_pool.device, config.copy_backend)
        self._stream = torch.cuda.Stream(device_pool.device) if device_pool.is_cuda else None
        self.stats = CacheStats()
        self._leases: dict[int, LookupResult] = {}
        self._loads: dict[int, list[ControllerLoad]] = {}  # lease id -> its loads
        self._lease_ids = itertools.count(1)
        self._runner: AsyncRunner | None = None
        self._l3 = None
        pool = HostPool(self.layout, config.host_pool_pages)
        self._host = HostStore(pool, policy=config.eviction_policy, on_evict=self._on_evict)
        if config.l3.connector is not None:
            try:
                self._open_l3()
            except BaseException:
                pool.close()
                raise

    def _open_l3(self) -> None:
        from connectors import open_connector

        self._runner = AsyncRunner()
        options = dict(self.config.l3.options)
        options.setdefault("fingerprint", self.layout.fingerprint())

        async def open_on_loop():
            # A connector belongs to the loop it is created on; create it on the runner's.
            return open_connector(self.config.l3.connector, **options)

        try:
            self._l3 = self._l3_call(open_on_loop())
        except BaseException:
            self._runner.close()
            raise

    def _l3_call(self, coro):
        return self._runner.run(coro, self.config.l3.timeout_s)

    @property
    def host_store(self) -> HostStore:
        return self._host

    # ---- lookup ---------------------------------------------------------------
    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        keys = page_keys(self._ns_digest, tokens, self.layout.page_size)
        in_l2 = [self._host.index.get(k) is not None for k in keys]
        # Lease every L2 page of the chain first, so filling a gap from L3 can't
        # evict a later page of the same chain.
        held = [k for k, present in zip(keys, in_l2) if present]
        self._host.lease(held)
        num_hit, num_l3 = 0, 0
        try:
            while num_hit < len(keys):
                if in_l2[num_hit]:
                    num_hit += 1
                    continue
                gap_end = next((j for j in range(num_hit, len(keys)) if in_l2[j]), len(keys))
                fetched = self._fetch_from_l3(keys, num_hit, gap_end) if self._l3 is not None else 0
                num_hit += fetched
                num_l3 += fetched
                if num_hit < gap_end:
                    break
        except BaseException:
            fetched = [k for k, present in zip(keys[:num_hit], in_l2) if not present]
            self._host.release(held + fetched)
            raise
        self._host.release([k for k, present in zip(keys[num_hit:], in_l2[num_hit:]) if present])
        hit = keys[:num_hit]
        self._host.touch(hit)
        result = LookupResult(next(self._lease_ids), tuple(hit), self.layout.page_size,
                              num_hit - num_l3, num_l3)
        self._leases[result.lease_id] = result
        self.stats.num_lookups += 1
        self.stats.num_lookup_pages += len(keys)
        self.stats.num_l2_hit_pages += num_hit - num_l3
        self.stats.num_l3_hit_pages += num_l3
        return result

    def _fetch_from_l3(self, keys: list[PageKey], start: int, end: int) -> int:
        """Bring ``keys[start:end]`` (absent from L2) from L3 into L2, leased.

        Returns how many consecutive pages arrived; stops at the first miss, since
        a page after a gap is of no use to a prefix."""
        try:
            num_present = self._l3_call(self._l3.exists(keys[start:end]))
        except Exception as exc:  # noqa: BLE001 - an L3 outage is a miss, not an engine failure
            log.warning("L3 exists() failed, treating as miss: %s", exc)
            return 0
        slots = self._reserve_up_to(num_present)
        if not slots:
            return 0
        wanted = keys[start : start + len(slots)]
        buffers = [self._host.pool.slot_view(s) for s in slots]
        try:
            found = self._l3_call(self._l3.get_into(wanted, buffers))
        except Exception as exc:  # noqa: BLE001
            log.warning("L3 get_into() failed, treating as miss: %s", exc)
            found = [False] * len(wanted)
        del buffers
        num_ok = next((i for i, ok in enumerate(found) if not ok), len(found))
        self._host.abort(slots[num_ok:])
        parents = [keys[i - 1] if i else None for i in range(start, start + num_ok)]
        self._host.commit(wanted[:num_ok], slots[:num_ok], parents)
        self._host.lease(wanted[:num_ok])
        return num_ok

    def _reserve_up_to(self, n: int) -> list[int]:
        """As many slots as possible up to ``n`` (leased pages can't be evicted for them)."""
        while n > 0:
            slots = self._host.reserve(n)
            if slots is not None:
                return slots
            n //= 2
        return []

    # ---- load -------------------------------------------------------------------
    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        if self._leases.get(result.lease_id) is not result:
            raise CacheError(f"lease {result.lease_id} has ended: lookup() again before load()")
        if len(device_pages) != result.num_hit_pages:
            raise CacheError(
                f"load() needs one device page per hit page: got {len(device_pages)} "
                f"for {result.num_hit_pages} hit pages"
            )
        if not result.num_hit_pages:
            return CompletedLoad()
        slots = self._host.slots_of(result.keys)
        host = self._host.pool

        def copy_layer(layer: int, stream: object) -> None:
            self._copy.copy_pages(
                host.tensor, host.layout, slots, self._device_pool, self.layout,
                list(device_pages), layer=layer, stream=stream,
            )

        if self._stream is not None:
            handle: ControllerLoad = CudaStreamLoad(self.layout.num_layers, copy_layer, self._stream)
        else:
            handle = LazyLayerLoad(self.layout.num_layers, copy_layer)
        self._loads.setdefault(result.lease_id, []).append(handle)
        return handle

    # ---- store --------------------------------------------------------------------
    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        keys = page_keys(self._ns_digest, tokens, self.layout.page_size)
        if len(device_pages) < len(keys):
            raise CacheError(
                f"store() got {len(device_pages)} device pages for {len(keys)} full pages of tokens"
            )
        self._check_device_pages(device_pages[: len(keys)])
        index = self._host.index
        absent = [i for i, key in enumerate(keys) if key not in index]
        self._host.touch([key for key in keys if key in index])
        slots = self._reserve_up_to(len(absent)) if absent else []
        placed = absent[: len(slots)]
        if placed:
            try:
                self._copy.copy_pages(
                    self._device_pool, self.layout, [device_pages[i] for i in placed],
                    self._host.pool.tensor, self._host.pool.layout, slots,
                )
                if self._device_pool.is_cuda:
                    torch.cuda.current_stream(self._device_pool.device).synchronize()
            except BaseException:
                self._host.abort(slots)
                raise
            placed_keys = [keys[i] for i in placed]
            self._host.commit(placed_keys, slots, [keys[i - 1] if i else None for i in placed])
            self.stats.num_stored_pages += len(placed)
            if self._l3 is not None and self.config.l3.write_policy == "write_through":
                self._put_to_l3(placed_keys, slots)
        return StoreResult(len(keys), len(placed), len(absent) - len(placed))

    def _check_device_pages(self, pages: Sequence[int]) -> None:
        num_pages = self._device_pool.shape[2 if self.layout.arrangement == "layer_first" else 0]
        bad = [p for p in pages if not 0 <= int(p) < num_pages]
        if bad:
            raise CacheError(f"device pages {bad[:4]} are outside the engine pool of {num_pages} pages")

    # ---- L3 writes ------------------------------------------------------------------
    def _on_evict(self, keys: list[PageKey], slots: list[int]) -> None:
        self.stats.num_evicted_pages += len(keys)
        if self._l3 is not None and self.config.l3.write_policy == "write_back":
            self._put_to_l3(keys, slots)

    def _put_to_l3(self, keys: list[PageKey], slots: list[int]) -> None:
        values = [self._host.pool.slot_view(s) for s in slots]
        try:
            stored = self._l3_call(self._l3.put(keys, values))
            self.stats.num_spilled_pages += sum(bool(ok) for ok in stored)
        except Exception as exc:  # noqa: BLE001 - losing a cached page is allowed, crashing is not
            log.warning("L3 put() of %d pages failed, pages dropped: %s", len(keys), exc)

    # ---- leases and life cycle ---------------------------------------------------------
    def release(self, result: LookupResult) -> None:
        held = self._leases.get(result.lease_id)
        if held is None:
            return
        if held != result:
            raise CacheError(f"release() got a result that is not lease {result.lease_id} of this cache")
        del self._leases[result.lease_id]
        for handle in self._loads.pop(result.lease_id, ()):
            # The slots may be rewritten once unleased: copies out of them must be over.
            handle.finish()
        self._host.release(held.keys)

    def check_integrity(self, quiescent: bool = False) -> None:
        """Raise if L2's pool, index and leases disagree (``quiescent``: and nothing is held)."""
        self._host.check_integrity(quiescent)

    def close(self) -> None:
        """Release every lease, close L3, stop the I/O thread and remove the host pool,
        each even if an earlier step fails."""
        try:
            for result in list(self._leases.values()):
                self.release(result)
            if self._l3 is not None:
                l3, self._l3 = self._l3, None
                self._l3_call(l3.close())
        finally:
            try:
                if self._runner is not None:
                    self._runner.close()
                    self._runner = None
            finally:
                self._host.pool.close()
