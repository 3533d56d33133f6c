"""Small factories and a recording fake CacheClient for the decoder tests.

The fake keeps whole pages (every layer's K and V) in a dict keyed by a digest
of the token prefix, like the real page keys, and copies them into the engine's
pool *lazily*, one layer per ``wait_layer``: an engine that read a layer before
waiting for it would see stale pool contents and fail the bit-exactness tests.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from controller.api import CacheClient, CacheStats, LoadHandle, LookupResult, StoreResult
from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine
from decoder.model import pool_view
from kvstore.layout import KVLayout

_MODELS: dict[tuple, ReferenceDecoder] = {}


def tiny_model(**overrides: object) -> ReferenceDecoder:
    """A tiny-preset model, built once per distinct config (weights are read-only)."""
    key = tuple(sorted(overrides.items()))
    if key not in _MODELS:
        _MODELS[key] = ReferenceDecoder(DecoderConfig.preset("tiny", **overrides))
    return _MODELS[key]


def make_engine(
    page_size: int = 8, num_pages: int = 64, arrangement: str = "layer_first",
    model: ReferenceDecoder | None = None,
) -> ReferenceEngine:
    model = model or tiny_model()
    return ReferenceEngine(model, model.config.kv_layout(page_size, arrangement=arrangement), num_pages)


def random_tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


class FakeLoadHandle(LoadHandle):
    def __init__(self, cache: "FakeCache", pages: list[torch.Tensor], device_pages: list[int]):
        self._cache, self._pages, self._device_pages = cache, pages, device_pages
        self._is_loaded = [False] * cache.layout.num_layers

    def wait_layer(self, layer: int) -> None:
        self._cache.calls.append(("wait_layer", layer))
        if self._is_loaded[layer]:
            return
        pool, layout = self._cache.pool, self._cache.layout
        for kv in range(layout.num_kv):
            view = pool_view(pool, layout, layer, kv)
            for page, dev in zip(self._pages, self._device_pages):
                view[dev] = page[layer, kv]
        self._is_loaded[layer] = True

    def wait_all(self) -> None:
        self._cache.calls.append(("wait_all",))
        for layer in range(len(self._is_loaded)):
            if not self._is_loaded[layer]:
                self.wait_layer(layer)


class FakeCache(CacheClient):
    """Records every call in ``calls``; pages in ``l3_keys`` are reported as L3 hits."""

    def __init__(self, layout: KVLayout, pool: torch.Tensor) -> None:
        self.layout, self.pool = layout, pool
        self.pages: dict[bytes, torch.Tensor] = {}  # key -> [layer, kv, P, heads, dim]
        self.l3_keys: set[bytes] = set()
        self.leases: set[int] = set()
        self.calls: list[tuple] = []
        self._next_lease = 1

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        P = self.layout.page_size
        tokens = list(tokens)
        return [
            hashlib.blake2b(np.asarray(tokens[: (i + 1) * P], dtype="<i4").tobytes()).digest()[:16]
            for i in range(len(tokens) // P)
        ]

    def lookup(self, tokens):
        hits = []
        for key in self.keys(tokens):
            if key not in self.pages:
                break
            hits.append(key)
        num_l2 = next((i for i, k in enumerate(hits) if k in self.l3_keys), len(hits))
        lease = self._next_lease
        self._next_lease += 1
        self.leases.add(lease)
        self.calls.append(("lookup", len(tokens), len(hits)))
        return LookupResult(lease, tuple(hits), self.layout.page_size, num_l2, len(hits) - num_l2)

    def load(self, result, device_pages):
        self.calls.append(("load", tuple(device_pages)))
        assert result.lease_id in self.leases, "load after release"
        assert len(device_pages) == result.num_hit_pages
        return FakeLoadHandle(self, [self.pages[k] for k in result.keys], list(device_pages))

    def store(self, tokens, device_pages):
        self.calls.append(("store", len(tokens), tuple(device_pages)))
        keys = self.keys(tokens)
        assert len(device_pages) == len(keys)
        num_new = 0
        for key, dev in zip(keys, device_pages):
            if key in self.pages:
                continue
            self.pages[key] = torch.stack([
                torch.stack([pool_view(self.pool, self.layout, layer, kv)[dev].clone()
                             for kv in range(self.layout.num_kv)])
                for layer in range(self.layout.num_layers)
            ])
            num_new += 1
        return StoreResult(num_pages=len(keys), num_new_pages=num_new)

    def release(self, result):
        self.calls.append(("release", result.lease_id))
        self.leases.discard(result.lease_id)

    def stats(self):
        return CacheStats(num_l2_pages=len(self.pages))

    def close(self):
        self.leases.clear()

    def call_names(self) -> list[str]:
        return [c[0] for c in self.calls]


def engine_with_cache(page_size: int = 8, num_pages: int = 64, arrangement: str = "layer_first",
                      model: ReferenceDecoder | None = None) -> tuple[ReferenceEngine, FakeCache]:
    engine = make_engine(page_size, num_pages, arrangement, model)
    cache = FakeCache(engine.layout, engine.kv_pool)
    engine.attach_cache(cache)
    return engine, cache
