"""A hybrid model's side pools (SGLang's ``PoolName.MAMBA`` / ``SWA``) as kvstore entries.

SGLang's hybrid radix cache stores, next to the KV pages, one Mamba state per tree node
(``MambaPoolHost``: one host slot per state, ``page_size`` 1, keyed by the hash of the
node's last page, ``PoolHitPolicy.TRAILING_PAGES`` with one key) and, for sliding-window
models, the last window's pages of the SWA pool (an MHA host pool, one entry per page,
TRAILING_PAGES with the window's keys). Both are stored here as ``controller/hybrid.py``
stores its snapshots:

- in a cache of their own layout (one size class per pool: the state's bytes, or the SWA
  pool's pages), opened like the KV cache (embedded: by name + layout; daemon: the URL in
  ``kvstore_side_urls[pool]``, a daemon serving that layout, else the pages' daemon
  when it serves every layout);
- under a key chained to the KV page key it follows:
  ``BLAKE2b-128(key = side namespace digest, data = KV page key)``, the side namespace
  being the model's (model, TP rank/size, salt) with this pool's name and layout, so a
  state entry is reachable only through the exact prefix it was computed for;
- the hit rule is the backend's (``KVStoreHiCacheStorage.batch_exists_v2``): a prefix of B
  pages is restorable only if pages 0..B-1 are cached and every side pool has its
  trailing entries at B. An entry without its pages is never reached; pages without their
  entry are no hit past the last entry before them.

A Mamba state is the slot's tensors (temporal/SSM state, each conv state, registered
side states), byte for byte, packed in that order into one float32 "page" of
``state_layout`` (their bits, whatever their dtypes: the round trip is exact).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Sequence

import torch

from adapters.config import AdapterConfig
from adapters.keyed import KeyedCache, open_keyed_cache
from adapters.page_copy import check_page_view, pages_to_slots, slots_to_pages
from adapters.sglang.host_layout import layout_of, page_view
from controller.api import CacheError
from controller.config import ConfigError
from kvstore.layout import KVLayout
from kvstore.page_keys import KEY_BYTES, KeyNamespace, PageKey

STATE_PAGE_TOKENS = 8
"""A state entry's layout has 8 "tokens" per page, as ``decoder.hybrid_state``'s snapshots."""
STATE_CHUNK_FLOATS = 1 << 19
"""At most this many float32 per (layer, kv) chunk of a state page (the copy ops' unit)."""

SUPPORTED = ("mamba", "swa")


def state_layout(num_bytes: int) -> KVLayout:
    """The smallest page_first float32 layout of 8 "tokens" x 1 head holding ``num_bytes``."""
    floats = math.ceil(num_bytes / 4)
    per_layer = 2 * STATE_PAGE_TOKENS
    num_layers = max(1, math.ceil(floats / (2 * STATE_CHUNK_FLOATS)))
    head_dim = max(1, math.ceil(floats / (per_layer * num_layers)))
    return KVLayout(num_layers=num_layers, num_kv_heads=1, head_dim=head_dim,
                    page_size=STATE_PAGE_TOKENS, dtype="float32", arrangement="page_first")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 view (a view: writes go through)."""
    if not t.is_contiguous():
        raise ConfigError("a Mamba host slot's tensor is not contiguous; kvstore needs "
                          "SGLang's page_first / page_first_direct Mamba host layout")
    return t.reshape(-1).view(torch.uint8)


class MambaSlots:
    """A ``MambaPoolHost`` slot by slot: the tensors one state is made of, in a fixed order."""

    def __init__(self, host_pool: Any) -> None:
        if str(host_pool.layout) not in ("page_first", "page_first_direct"):
            raise ConfigError(f"SGLang Mamba host layout {host_pool.layout!r} is not supported")
        self.pool = host_pool
        self.nbytes = sum(_bytes(t).numel() for t in self._tensors(0))

    def _tensors(self, slot: int) -> list[torch.Tensor]:
        # page_first: axis 0 is the slot; each slot's rows are contiguous.
        p = self.pool
        return [p.temporal_buffer[slot], *(c[slot] for c in p.conv_buffer),
                *(s[slot] for s in getattr(p, "slot_state_buffers", ()))]

    def to_entry(self, slot: int, entry: torch.Tensor) -> None:
        out, at = entry.reshape(-1).view(torch.uint8), 0
        for t in self._tensors(slot):
            b = _bytes(t)
            out[at: at + b.numel()].copy_(b)
            at += b.numel()

    def from_entry(self, entry: torch.Tensor, slot: int) -> None:
        src, at = entry.reshape(-1).view(torch.uint8), 0
        for t in self._tensors(slot):
            b = _bytes(t)
            b.copy_(src[at: at + b.numel()])
            at += b.numel()


class SidePool:
    """One side pool of the model, served from a kvstore cache of its own layout."""

    def __init__(self, name: str, host_pool: Any, storage_config: Any, config: AdapterConfig,
                 kv_namespace: KeyNamespace) -> None:
        self.name = name
        self.page_size = int(host_pool.page_size or 1)
        if name == "mamba":
            if not hasattr(host_pool, "temporal_buffer"):
                raise ConfigError(f"SGLang's {name!r} host pool is a {type(host_pool).__name__}, "
                                  "not a MambaPoolHost; kvstore cannot read its state")
            self._mamba = MambaSlots(host_pool)
            self.layout = state_layout(self._mamba.nbytes)
        else:   # swa: an MHA / MLA host pool of its own, stored page by page
            self._mamba = None
            self.layout = layout_of(host_pool)
            self._view = page_view(host_pool.kv_buffer, str(host_pool.layout), self.layout)
        # TP rank always in: Mamba state and SWA heads are sharded over TP ranks.
        self.namespace = KeyNamespace(f"{kv_namespace.model_id}|side:{name}", self.layout,
                                      tp_rank=int(storage_config.tp_rank),
                                      tp_size=int(storage_config.tp_size),
                                      cache_salt=config.cache_salt)
        self._ns_digest = self.namespace.digest()
        side_config = _side_config(config, name, storage_config)
        try:
            self.cache = open_keyed_cache(side_config, self.layout)
        except CacheError as exc:
            if config.is_embedded or side_config.url != config.url:
                raise
            raise ConfigError(
                f"the daemon at {config.url} cannot serve the {name!r} side pool's layout ({exc}); "
                f"start it without --layout-* (a daemon of every layout), or start a daemon for "
                f"that layout and name it in --hicache-storage-backend-extra-config as "
                f"\"kvstore_side_urls\": {{\"{name}\": \"ipc://...\"}}") from None
        if self._mamba is not None:
            entry = self.cache.host_tensor[0]
            if not entry.is_contiguous() or entry.numel() * entry.element_size() < self._mamba.nbytes:
                raise ConfigError(f"kvstore's {name} cache slots do not hold a state of "
                                  f"{self._mamba.nbytes} bytes")
        else:
            check_page_view(self._view, self.cache.host_tensor, f"SGLang {name} host pool")

    def entry_keys(self, page_keys: Sequence[PageKey]) -> list[PageKey]:
        """The entry after each KV page: chained to that page's key (module doc)."""
        blake, ns = hashlib.blake2b, self._ns_digest
        return [blake(k, digest_size=KEY_BYTES, key=ns).digest() for k in page_keys]

    def _host_pages(self, host_indices: torch.Tensor, n: int) -> list[int]:
        P = self.page_size
        return [int(s) // P for s in host_indices[: n * P: P].tolist()]

    def exists(self, keys: Sequence[PageKey]) -> list[bool]:
        """Entry by entry (entries are not a chain: each stands alone). One lookup per key:
        through a daemon, one request each (a batched existence call would make it one)."""
        return [self.cache.count_cached([k]) == 1 for k in keys]

    def load(self, keys: Sequence[PageKey], host_indices: torch.Tensor) -> list[bool]:
        """Copy each cached entry into its host page; stops at the first miss (SGLang
        counts the leading run of successes)."""
        pages = self._host_pages(host_indices, len(keys))
        done: list[bool] = []
        for key, page in zip(keys, pages):
            lease = self.cache.lookup_keys([key])
            try:
                ok = lease.num_hit_pages == 1
                if ok:
                    self.cache.check_fresh()
                    self._from_slot(lease.slots[0], page)
                    ok = self.cache.num_intact_pages(lease) == 1   # the slot kept its owner
            finally:
                self.cache.release_keys(lease)
            if not ok:
                break
            done.append(True)
        return done + [False] * (len(keys) - len(done))

    def store(self, keys: Sequence[PageKey], host_indices: torch.Tensor) -> list[bool]:
        """Store each host page under its entry key (cached ones are not copied again)."""
        pages = self._host_pages(host_indices, len(keys))
        flags = []
        for key, page in zip(keys, pages):
            def write(positions, slots, page=page):
                for slot in slots:
                    self._to_slot(page, slot)
            flags.append(all(self.cache.store_keys([key], write).stored_flags()))
        return flags

    def _to_slot(self, page: int, slot: int) -> None:
        if self._mamba is not None:
            self._mamba.to_entry(page, self.cache.host_tensor[slot])
        else:
            pages_to_slots(self._view, [page], self.cache.host_tensor, [slot])

    def _from_slot(self, slot: int, page: int) -> None:
        if self._mamba is not None:
            self._mamba.from_entry(self.cache.host_tensor[slot], page)
        else:
            slots_to_pages(self.cache.host_tensor, [slot], self._view, [page])

    def close(self) -> None:
        self.cache.close()


def _side_config(config: AdapterConfig, name: str, storage_config: Any) -> AdapterConfig:
    """Embedded: the same cache name (a separate cache, as its layout differs), with a disk
    L3 in ``<the pages' directory>.side-<pool>`` (a disk store directory has one owner;
    Redis and Mooncake keys differ by namespace, so they are shared as they are).
    Daemon: the pages' daemon when it serves every layout (started without --layout-*);
    else a daemon of the side pool's layout, named in ``kvstore_side_urls``."""
    if config.is_embedded:
        l3 = config.controller.l3
        if l3.connector == "disk" and "path" in l3.options:
            path = f"{os.path.normpath(str(l3.options['path']))}.side-{name}"
            options = {**l3.options, "path": path}
            controller = dataclasses.replace(config.controller,
                                             l3=dataclasses.replace(l3, options=options))
            return dataclasses.replace(config, controller=controller)
        return config
    urls = (storage_config.extra_config or {}).get("kvstore_side_urls") or {}
    url = urls.get(name) if isinstance(urls, dict) else None
    # Without a URL of its own: the pages' daemon, which serves it when it serves every layout.
    return dataclasses.replace(config, url=str(url)) if url else config

