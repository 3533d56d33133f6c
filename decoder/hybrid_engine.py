"""HybridEngine: prefill and greedy decode of one request at a time on the hybrid decoder,
with its prefix (pages + state snapshot) from a HybridCache (controller/hybrid.py).

    hit = cache.lookup(prompt)                    # B pages and the snapshot after them
    load pages -> kv pool, snapshot -> slot; unpack: SSD state, window K/V -> window pool
    prefill [B*P, n) in chunks (below), capturing the SSD state at every snapshot end
    (first token ready: TTFT ends)
    store pages + snapshots (all or nothing), release; decode greedily

Chunks: ``prefill_chunk_len`` tokens counted from the first computed position, cut again
at each ``split_at`` position and at the two end-of-prompt snapshot positions
(controller/hybrid.py ``snapshot_ends``), which depend only on the prompt's length; stride
snapshots sit on the SSD scan's block grid (the stride is a multiple of ``ssd_chunk``), so
capturing them changes no op. With one page per chunk (the default) every run computes the
same bits; with longer chunks, a cache run whose hit ends at B equals the cache-off run cut
at B and at the cuts of the run(s) that stored the prefix (``split_at=[...]``; for a prefix
stored by one run of an m-token prompt from position 0: m - 1 and m rounded down to pages),
as for the dense engine.

A load that fails (LoadError) of either group, or a snapshot that does not unpack, means
recomputing the whole prompt: a snapshot is of no use without every page before it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from controller.api import LoadError
from controller.hybrid import HybridCache
from kvstore.layout import DTYPES

from .engine import EngineError, PageAllocator, chunk_bounds
from .hybrid_model import HybridDecoder, HybridPools, HybridState
from .hybrid_state import SnapshotCodec

log = logging.getLogger(__name__)


@dataclass
class HybridResult:
    prompt_len: int
    tokens: list[int]
    logits: torch.Tensor
    """float32 CPU [max_new_tokens, vocab]."""
    ttft_s: float
    num_cached_tokens: int = 0
    num_l2_tokens: int = 0
    num_l3_tokens: int = 0
    snapshot_tier: str = ""
    """"L2" or "L3": where the hit's snapshot was found ("" without a hit)."""
    loaded_bytes: int = 0
    """Bytes the hit copied into the engine: its pages and its snapshot."""
    num_snapshots_stored: int = 0
    num_load_failed_tokens: int = 0
    rows: list = field(default_factory=list, repr=False)
    """The logits rows while the request runs (stacked into ``logits`` at its end)."""


class HybridEngine:
    """One hybrid model, its pools (full-attention pages, window pages, snapshot slots) and an
    optional HybridCache, whose clients must be connected to ``pools.kv`` and
    ``snapshot_pool`` (build the engine first, then the cache, then ``attach_cache``)."""

    def __init__(self, model: HybridDecoder, page_size: int, num_device_pages: int,
                 kv_dtype: str = "float32", prefill_chunk_len: int | None = None,
                 num_snapshot_slots: int = 8) -> None:
        c = model.config
        chunk = page_size if prefill_chunk_len is None else prefill_chunk_len
        if chunk <= 0 or chunk % page_size:
            raise EngineError(f"prefill_chunk_len must be a positive multiple of the page size "
                              f"({page_size}), got {prefill_chunk_len!r}")
        self.model, self.page_size, self.prefill_chunk_len = model, page_size, chunk
        device, dtype = model.device, DTYPES[kv_dtype]
        kv_layout = c.kv_layout(page_size, kv_dtype)
        window_layout = c.window_layout(page_size, kv_dtype)
        self.pools = HybridPools(
            torch.zeros(kv_layout.pool_shape(num_device_pages), dtype=dtype, device=device), kv_layout,
            None if window_layout is None else torch.zeros(window_layout.pool_shape(num_device_pages),
                                                          dtype=dtype, device=device),
            window_layout)
        self.codec = SnapshotCodec(c, kv_dtype)
        self.snapshot_layout = self.codec.layout()
        self.snapshot_pool = torch.zeros(self.snapshot_layout.pool_shape(num_snapshot_slots),
                                         dtype=torch.float32, device=device)
        self.allocator = PageAllocator(num_device_pages)
        self.cache: HybridCache | None = None

    def attach_cache(self, cache: HybridCache | None) -> None:
        if cache is not None:
            if cache.pages.layout.fingerprint() != self.pools.kv_layout.fingerprint():
                raise EngineError("the cache's page layout differs from the engine's kv layout")
            if cache.snapshots.layout.fingerprint() != self.snapshot_layout.fingerprint():
                raise EngineError("the cache's snapshot layout differs from this model's")
            if self.snapshot_pool.shape[0] < 2:
                raise EngineError("an engine with a cache needs num_snapshot_slots >= 2 (one to "
                                  "load into, the others to store from)")
            if cache.align_pages % self.align_pages:
                raise EngineError(f"the cache's align_pages ({cache.align_pages}) must be a multiple of "
                                  f"{self.align_pages}: snapshots sit on the SSD scan's block grid "
                                  f"({self.model.config.ssd_chunk} tokens)")
        self.cache = cache

    @property
    def align_pages(self) -> int:
        """Pages per step of the grid where the SSD state exists without cutting a prefill
        chunk (the scan block, in pages): a HybridCache's ``align_pages`` for this engine."""
        return math.lcm(self.model.config.ssd_chunk, self.page_size) // self.page_size

    def snapshot_slot(self, i: int) -> torch.Tensor:
        return self.snapshot_pool[i].view(-1)

    # ---- one request ----------------------------------------------------------------------
    def generate(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int,
                 split_at: int | Sequence[int] = 0) -> HybridResult:
        """``split_at``: positions (multiples of the page size) where a prefill chunk also
        starts; a cache-off run cut where a cache run's hit (and its prefix's store) cut."""
        tokens = [int(t) for t in np.asarray(prompt).reshape(-1)]
        n, P, c = len(tokens), self.page_size, self.model.config
        if not tokens or max_new_tokens < 1 or n + max_new_tokens > c.base.max_positions:
            raise EngineError(f"prompt of {n} tokens + {max_new_tokens} new must be in 1.."
                              f"{c.base.max_positions} (and max_new_tokens >= 1)")
        if min(tokens) < 0 or max(tokens) >= c.base.vocab_size:
            raise EngineError(f"token ids must be in [0, {c.base.vocab_size})")
        cuts = [split_at] if isinstance(split_at, int) else [int(c) for c in split_at]
        if any(c % P or c < 0 for c in cuts):
            raise EngineError(f"split_at must be multiples of the page size ({P}), got {split_at}")
        split_at = sorted(set(cuts))
        started = time.perf_counter()
        pages = self.allocator.allocate(-(-(n + max_new_tokens - 1) // P))
        try:
            return self._run(tokens, max_new_tokens, split_at, pages, started)
        finally:
            self.allocator.free(pages)

    def _run(self, tokens: list[int], max_new: int, split_at: list[int], pages: list[int],
             started: float) -> HybridResult:
        n, P, device = len(tokens), self.page_size, self.model.device
        page_table = torch.tensor(pages, dtype=torch.long, device=device)
        prompt = torch.tensor(tokens, dtype=torch.long, device=device)
        result = HybridResult(n, [], torch.empty(0), 0.0)
        state, first, hit, page_handle = HybridState.zeros(self.model.config, device), 0, None, None
        cache = self.cache
        if cache is not None:
            hit = cache.lookup(tokens)
        try:
            if hit is not None and hit.num_pages:
                state, first, page_handle = self._load(hit, pages, page_table, result)
            ends = cache.snapshot_ends(n) if cache is not None else []
            if hit is not None:
                # a snapshot where another prompt branched off (on the scan's block grid, so
                # that capturing it changes no op)
                branch = cache.branch_snapshot(hit)
                ends = sorted(set(ends) | ({branch} if branch else set()))
            captured = self._prefill(prompt, first, split_at, page_table, state, ends, page_handle, result)
            result.ttft_s = time.perf_counter() - started
            if cache is not None:
                self._store(tokens, pages, page_table, captured, result)
        finally:
            if hit is not None:
                cache.release(hit)
        for _ in range(max_new - 1):
            pos = n + len(result.tokens) - 1
            fed = torch.tensor(result.tokens[-1:], dtype=torch.long, device=device)
            out = self.model.forward_hidden(fed, pos, self.pools, page_table, state)
            self._emit(self.model.compute_logits(out.hidden)[0], result)
        result.logits, result.rows = torch.stack(result.rows).float().cpu(), []
        return result

    def _emit(self, logits: torch.Tensor, result: HybridResult) -> None:
        result.tokens.append(int(logits.argmax()))
        result.rows.append(logits)

    def _load(self, hit, pages: list[int], page_table: torch.Tensor,
              result: HybridResult) -> tuple[HybridState, int, object]:
        """Start the pages' load, wait for the snapshot and unpack it; on any failure the
        whole prompt is recomputed (module doc)."""
        P = self.page_size
        try:
            page_handle, snap_handle = self.cache.load(hit, pages, 0)
            snap_handle.verify()
        except LoadError as err:
            log.warning("hybrid load failed (%s); recomputing the prompt", err)
            result.num_load_failed_tokens = hit.num_pages * P
            return HybridState.zeros(self.model.config, self.model.device), 0, None
        end = hit.num_pages * P
        state = self.codec.unpack(self.snapshot_slot(0), self.pools, page_table, end)
        num_l2 = min(hit.pages.num_l2_pages, hit.num_pages)
        result.num_cached_tokens = end
        result.num_l2_tokens, result.num_l3_tokens = num_l2 * P, (hit.num_pages - num_l2) * P
        result.snapshot_tier = "L3" if hit.snapshot_from_l3 else "L2"
        result.loaded_bytes = hit.num_pages * self.pools.kv_layout.page_bytes + self.codec.nbytes
        return state, end, page_handle

    def _chunks(self, first: int, n: int, split_at: list[int]) -> list[tuple[int, int]]:
        """chunk_bounds from ``first``, also cut at ``split_at`` and the end-of-prompt snapshot
        positions (module doc)."""
        P = self.page_size
        cuts = sorted({c for c in (n // P * P, (n - 1) // P * P, *split_at) if first < c < n})
        out: list[tuple[int, int]] = []
        lo = first
        for cut in cuts + [n]:
            out += chunk_bounds(lo, cut, self.prefill_chunk_len)
            lo = cut
        return out

    def _prefill(self, prompt: torch.Tensor, first: int, split_at: list[int], page_table: torch.Tensor,
                 state: HybridState, snapshot_ends: list[int], page_handle,
                 result: HybridResult) -> dict[int, HybridState]:
        P, n = self.page_size, prompt.numel()
        wanted = {b * P for b in snapshot_ends if b * P > first}
        captured: dict[int, HybridState] = {}
        chunks = self._chunks(first, n, split_at)
        for index, (lo, hi) in enumerate(chunks):
            block = self.model.config.ssd_chunk
            capture = [e for e in sorted(wanted) if lo < e <= hi and (e == hi or e % block == 0)]
            wait = page_handle.wait_layer if page_handle is not None and index == 0 else None
            try:
                out = self.model.forward_hidden(prompt[lo:hi], lo, self.pools, page_table, state,
                                                capture, wait)
                if index == len(chunks) - 1 and page_handle is not None:
                    page_handle.verify()
            except LoadError as err:
                log.warning("hybrid page load failed (%s); recomputing the prompt", err)
                result.num_load_failed_tokens = first
                result.num_cached_tokens = result.num_l2_tokens = result.num_l3_tokens = 0
                result.loaded_bytes, result.snapshot_tier = 0, ""
                fresh = HybridState.zeros(self.model.config, self.model.device)
                state.conv, state.ssm = fresh.conv, fresh.ssm
                return self._prefill(prompt, 0, split_at, page_table, state, snapshot_ends, None, result)
            captured.update(out.captured)
        self._emit(self.model.compute_logits(out.hidden[-1:])[0], result)
        return captured

    def _store(self, tokens: list[int], pages: list[int], page_table: torch.Tensor,
               captured: dict[int, HybridState], result: HybridResult) -> None:
        num_slots = self.snapshot_pool.shape[0]
        # Slot 0 took the loaded snapshot; the rest hold the ones stored now (the newest
        # first if there are more than slots: the end of the prompt is where hits come).
        chosen = sorted(captured)[-(num_slots - 1):]
        slots: dict[int, int] = {}
        for i, end in enumerate(chosen, start=1):
            self.codec.pack(captured[end], self.pools, page_table, end, self.snapshot_slot(i))
            slots[end // self.page_size] = i
        stored = self.cache.store(tokens, pages, slots)
        result.num_snapshots_stored = stored.num_snapshots
