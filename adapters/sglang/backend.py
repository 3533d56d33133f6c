"""KVStoreHiCacheStorage: kvstore as SGLang's HiCache L3 (``HiCacheStorage``).

SGLang keeps L1 (device) and L2 (its own pinned host pool) and calls its storage
backend to move pages between that host pool and L3. Here "L3" is kvstore: its
shared L2 (the daemon's shm slots, or an embedded pool) and kvstore's own L3
behind it, so every SGLang process on a node shares one cache::

    batch_set_v1:  SGLang host pool --copy--> reserved kvstore slots --commit--> visible
    batch_get_v1:  lookup (L3 -> kvstore L2 if needed) --copy--> SGLang host pool
    batch_exists:  lookup + release (the longest cached prefix of the keys)

Keys are SGLang's page hashes digested into the namespace of ``namespace_for``.
The zero-copy v1 calls need ``"interface_v1": 1`` in the extra config (else SGLang
uses the older get/set calls with flat pages, one copy more). Both store pages in
kvstore's slot order, whatever SGLang's host layout: a page written through either
call from any layout reads back the same through the other. Hybrid models' Mamba
state and SWA window pools go through the v2 calls to entries of their own layout
chained to the page keys (``adapters.sglang.side_pools``; the hit rule is
``batch_exists_v2``); other side pools are refused when SGLang registers them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

from adapters.config import AdapterConfig
from adapters.keyed import KeyedCache, open_keyed_cache
from adapters.keys import digest_keys
from adapters.page_copy import check_page_view, pages_to_slots, slots_to_pages
from adapters.sglang.host_layout import flat_page_view, layout_of, page_view
from adapters.sglang.namespace import namespace_for
from adapters.sglang.side_pools import SUPPORTED, SidePool
from controller.api import CacheError
from controller.config import ConfigError
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Metrics:
    """Same fields as SGLang's ``StorageMetrics`` (used if that can't be imported)."""

    prefetch_pgs: list = dataclasses.field(default_factory=list)
    backup_pgs: list = dataclasses.field(default_factory=list)
    prefetch_bandwidth: list = dataclasses.field(default_factory=list)
    backup_bandwidth: list = dataclasses.field(default_factory=list)


def _new_metrics():
    try:
        from sglang.srt.observability.metrics_collector import StorageMetrics
    except Exception:  # noqa: BLE001 - the collector's module pulls in SGLang's model configs
        return _Metrics()
    return StorageMetrics()


class KVStoreHiCacheStorage(HiCacheStorage):
    """SGLang's storage backend interface served by a kvstore cache (daemon or embedded).

    Constructed by SGLang as ``cls(storage_config, kwargs)``; the cache is opened
    when SGLang registers its host pool, whose shapes name the page layout.
    Thread-safe: SGLang calls it from its prefetch and backup threads.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.storage_config = storage_config
        self.config = AdapterConfig.from_extra(storage_config.extra_config)
        self._cache: KeyedCache | None = None
        self._ns_digest = b""
        self._side: dict[str, SidePool] = {}
        self._metrics_lock = threading.Lock()
        self._metrics = _new_metrics()
        mem_pool_host = (kwargs or {}).get("mem_pool_host")
        if mem_pool_host is not None:
            self.register_mem_pool_host(mem_pool_host)

    # ---- set-up ------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Open the cache for the layout of SGLang's host pool and view its buffer by page."""
        super().register_mem_pool_host(mem_pool_host)
        if self._cache is not None:
            return
        self.layout = layout_of(mem_pool_host)
        self.namespace = namespace_for(self.storage_config, self.layout, self.config)
        self._ns_digest = self.namespace.digest()
        self._mem_layout = str(mem_pool_host.layout)
        self._view = page_view(mem_pool_host.kv_buffer, self._mem_layout, self.layout)
        self._cache = open_keyed_cache(self.config, self.layout)
        check_page_view(self._view, self._cache.host_tensor, "SGLang host pool")

    def _require_cache(self) -> KeyedCache:
        if self._cache is None:
            raise CacheError("KVStoreHiCacheStorage: SGLang has not registered its host pool "
                             "(register_mem_pool_host) yet")
        return self._cache

    def _keys(self, page_hashes: List[str]) -> list[PageKey]:
        return digest_keys(self._ns_digest, page_hashes)

    def _pages_of(self, host_indices: torch.Tensor, num_keys: int) -> list[int]:
        """Host page ids: page i of the call starts at token row ``host_indices[i * P]``."""
        P = self.layout.page_size
        starts = host_indices[: num_keys * P : P].tolist()
        return [int(s) // P for s in starts]

    # ---- zero-copy v1 --------------------------------------------------------------------
    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """How many leading keys are cached (pages in kvstore's L3 come up to its L2)."""
        return self._require_cache().count_cached(self._keys(keys))

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Copy the cached prefix of ``keys`` into SGLang's host pool at ``host_indices``."""
        cache = self._require_cache()
        start = time.perf_counter()
        lease = cache.lookup_keys(self._keys(keys))
        num_hit = lease.num_hit_pages
        try:
            if num_hit:
                cache.check_fresh()
                pages = self._pages_of(host_indices, num_hit)
                slots_to_pages(cache.host_tensor, lease.slots, self._view, pages)
                # Pages whose slot changed owner during the copy are misses (the fence).
                num_hit = cache.num_intact_pages(lease)
        finally:
            cache.release_keys(lease)
        self._record("prefetch", num_hit, start)
        return [True] * num_hit + [False] * (len(keys) - num_hit)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Copy SGLang's pages at ``host_indices`` into kvstore (pages cached already are
        not copied). MLA ranks other than the storage writer store nothing (their pages
        equal the writer's) and report success, as SGLang's own backends do."""
        cache = self._require_cache()
        if not self.storage_config.is_storage_writer:
            return [True] * len(keys)
        start = time.perf_counter()
        pages = self._pages_of(host_indices, len(keys))

        def write(positions, slots):
            pages_to_slots(self._view, [pages[i] for i in positions], cache.host_tensor, slots)

        reservation = cache.store_keys(self._keys(keys), write)
        self._record("backup", len(reservation.slots), start)
        return reservation.stored_flags()

    # ---- the older calls: one flat page per key --------------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        found = self.batch_get([key], [target_location])
        return found[0] if found else None

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        """Fill ``target_locations[i]`` (SGLang's flat dummy pages) for the cached prefix."""
        cache = self._require_cache()
        if target_locations is None:
            raise CacheError("KVStoreHiCacheStorage.batch_get needs target_locations "
                             "(SGLang passes get_dummy_flat_data_page() buffers)")
        lease = cache.lookup_keys(self._keys(keys))
        try:
            cache.check_fresh()
            for slot, flat in zip(lease.slots, target_locations):
                flat_page_view(flat, self._mem_layout, self.layout).copy_(cache.host_tensor[slot])
            n = cache.num_intact_pages(lease)   # a slot that changed owner: a miss from there
        finally:
            cache.release_keys(lease)
        return list(target_locations[:n]) + [None] * (len(keys) - n)

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        """Store flat pages (``values[i]`` as SGLang's ``get_data_page(..., flat=True)``)."""
        cache = self._require_cache()
        if not self.storage_config.is_storage_writer:
            return True

        def write(positions, slots):
            for i, slot in zip(positions, slots):
                cache.host_tensor[slot].copy_(flat_page_view(values[i], self._mem_layout, self.layout))

        return all(cache.store_keys(self._keys(keys), write).stored_flags())

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- hybrid models' side pools (the v2 calls) ------------------------------------------
    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """SGLang registers each host pool of the model here as it attaches the backend:
        the KV pool (already registered by ``register_mem_pool_host``) and, for hybrid
        models, side pools. Mamba state and SWA window pools are served from entries of
        their own layout (``adapters.sglang.side_pools``); any other side pool (DSA
        indexer, DeepSeek-V4 compressed pools, draft KV) is refused with ConfigError,
        which fails SGLang's attach (raising there fails it): the engine does not serve
        KV pages without the state they belong to."""
        name = str(host_pool_name)
        if name == PoolName.KV.value:
            super().register_mem_host_pool_v2(host_pool, host_pool_name)
            return
        if name not in SUPPORTED:
            self.close()
            raise ConfigError(
                f"the kvstore HiCache backend serves KV pages and the {list(SUPPORTED)} side "
                f"pools, but this model also has a {name!r} host pool (DSA indexer, compressed "
                "or draft KV). kvstore cannot store that pool yet; run this model without "
                "--hicache-storage-backend (HiCache keeps L1/L2), or with a backend that "
                "serves it")
        self._require_cache()
        if name not in self._side:
            try:
                self._side[name] = SidePool(name, host_pool, self.storage_config, self.config,
                                            self.namespace)
            except Exception:
                self.close()
                raise
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    def _side_pool(self, name: Any) -> SidePool | None:
        return self._side.get(str(name))

    def batch_exists_v2(self, keys: List[str], pool_transfers: Optional[List[PoolTransfer]] = None,
                        extra_info: Any = None) -> PoolTransferResult:
        """The hit rule: the prefix lengths B (in pages) such that pages 0..B-1 are cached
        and every side pool has its entries at B (TRAILING_PAGES: the last ``len(keys)``
        pages before B; ALL_PAGES: every page before B). ``kv_hit_pages`` is the longest such
        B; ``restorable_prefix_pages`` all of them (SGLang intersects them across ranks)."""
        page_keys = self._keys(keys)
        kv_pages = self._require_cache().count_cached(page_keys)
        hit_count: dict = {PoolName.KV: kv_pages} if kv_pages else {}
        restorable = list(range(1, kv_pages + 1))
        for transfer in pool_transfers or []:
            if not restorable:
                break
            pool = self._side_pool(transfer.name)
            if pool is None:        # a pool we do not hold: nothing is restorable with it
                restorable = []
                break
            present = pool.exists(pool.entry_keys(page_keys[:kv_pages]))
            if transfer.hit_policy == PoolHitPolicy.TRAILING_PAGES:
                trailing = max(1, len(transfer.keys or ()))
                ok = [B for B in restorable if all(present[max(0, B - trailing):B])]
            elif transfer.hit_policy == PoolHitPolicy.ALL_PAGES:
                lead = present.index(False) if False in present else len(present)
                ok = [B for B in restorable if B <= lead]
            else:
                raise CacheError(f"kvstore: pool {transfer.name} asks for hit policy "
                                 f"{transfer.hit_policy}, which this backend does not serve")
            if ok:
                hit_count[transfer.name] = ok[-1]
            restorable = ok
        return PoolTransferResult(restorable[-1] if restorable else 0, hit_count, restorable)

    def batch_get_v2(self, transfers: List[PoolTransfer], extra_info: Any = None) -> dict:
        """Per pool, one flag per key (SGLang counts the leading successes): KV pages through
        the v1 path, side entries under the key chained to each key's page."""
        results = {}
        for t in transfers:
            keys = list(t.keys or [])
            if str(t.name) == PoolName.KV.value:
                results[t.name] = self.batch_get_v1(keys, t.host_indices)
                continue
            pool = self._side_pool(t.name)
            if pool is None or not keys:
                results[t.name] = [False] * len(keys)
                continue
            results[t.name] = pool.load(pool.entry_keys(self._keys(keys)), t.host_indices)
        return results

    def batch_set_v2(self, transfers: List[PoolTransfer], extra_info: Any = None) -> dict:
        """Per pool, one flag per key. Side entries are written by every rank (Mamba state
        and SWA heads are sharded over TP ranks even where MLA pages are not)."""
        results = {}
        for t in transfers:
            keys = list(t.keys or [])
            if str(t.name) == PoolName.KV.value:
                results[t.name] = self.batch_set_v1(keys, t.host_indices)
                continue
            pool = self._side_pool(t.name)
            if pool is None or not keys:
                results[t.name] = [False] * len(keys)
                continue
            results[t.name] = pool.store(pool.entry_keys(self._keys(keys)), t.host_indices)
        return results

    # ---- housekeeping ------------------------------------------------------------------------
    def _record(self, kind: str, num_pages: int, start: float) -> None:
        if not num_pages:
            return
        seconds = max(time.perf_counter() - start, 1e-9)
        gb_per_s = num_pages * self.layout.page_bytes / seconds / 1e9
        with self._metrics_lock:
            getattr(self._metrics, f"{kind}_pgs").append(num_pages)
            getattr(self._metrics, f"{kind}_bandwidth").append(gb_per_s)

    def get_stats(self):
        """Pages and GB/s per prefetch (get) and backup (set) since the last call, as
        SGLang's ``StorageMetrics``; SGLang polls this when storage metrics are on."""
        with self._metrics_lock:
            metrics, self._metrics = self._metrics, _new_metrics()
        return metrics

    def cache_stats(self):
        """kvstore's own counters (``CacheStats``) of the cache behind this backend."""
        return self._require_cache().stats()

    def clear(self) -> None:
        """Not supported: the cache is shared by every engine on the node; pages leave
        it by eviction. Logged, not raised (SGLang calls this on a flush request)."""
        log.warning("KVStoreHiCacheStorage.clear(): kvstore is shared; nothing is removed")

    def close(self) -> None:
        """Close this backend's handle on the cache (an embedded cache closes with its last)."""
        for pool in self._side.values():
            pool.close()
        self._side = {}
        if self._cache is not None:
            self._cache.close()
            self._cache = None
