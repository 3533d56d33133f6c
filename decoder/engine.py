"""ReferenceEngine: prefill and greedy decode over a paged KV pool, a request at a time
(``generate``) or in steps that a scheduler interleaves (``start``, ``prefill_step`` per
chunk, ``decode_step`` per token, ``finish``).

With a cache, a request goes::

    allocate device pages for prompt + output
    result = cache.lookup(prompt)                       # cached prefix, leased
    handle = cache.load(result, pages[:hit pages])      # into the engine's pool
    prefill the rest, one page per chunk; chunk 1 waits per layer on handle.wait_layer
    (the first token is ready here: TTFT ends)
    cache.store(full prompt pages)                      # only KV computed by prefill
    cache.release(result)
    greedy decode, one token per step; free the pages

Prefill always runs in chunks of exactly one page on the absolute page grid,
with or without a cache::

    positions  0 .. P-1 | P .. 2P-1 | ... | kP .. prompt_len-1
    chunk          0    |     1     | ... |   k (may be partial)

so a page loaded from the cache holds the bits that recomputing it would write,
and the suffix is computed by the very same calls: tokens and logits with the
cache on equal those with it off, exactly.

A GPU engine passes ``prefill_chunk_len`` (a multiple of the page size, e.g.
8192) and prefills in chunks of that many tokens, counted from the first
position it computes::

    cache hit ends at B:   [0 .. B) loaded | [B .. B+C) | [B+C .. B+2C) | ... (last may be short)
    cache off, split_at=B: [0 .. C) | ... | [.. B) | [B .. B+C) | ...      (same cuts after B)

Chunk shapes then depend on where the cache hit ends, so exactness holds against
a cache-off run that is split at the same position (``generate(..., split_at=B)``)
and whose pages [0, B) were stored by a run that computed them the same way. Decode-produced KV (one token per
call) is never stored, since a later prefill would compute those positions in
page-sized chunks and could differ in the last bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from controller.api import CacheClient, LoadError, LoadHandle, LookupResult
from kvstore.layout import KVLayout

from .model import ReferenceDecoder

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request cannot run on this engine; the message says why."""


@dataclass
class GenerationResult:
    """One request's output and where its prompt's KV came from."""

    prompt_len: int
    tokens: list[int]
    """Generated token ids (not the prompt), ``max_new_tokens`` of them."""
    logits: torch.Tensor
    """float32 CPU [max_new_tokens, vocab]: row i produced ``tokens[i]``."""
    ttft_s: float
    """Prompt in -> first token out (lookup, load and prefill included; the store of the
    prompt's pages, which follows, is not), seconds."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV was loaded from the cache (L2 + L3)."""
    num_l2_tokens: int = 0
    num_l3_tokens: int = 0
    num_computed_tokens: int = 0
    """Prompt tokens prefilled by the model: prompt_len - num_cached_tokens."""
    total_s: float = 0.0
    """Prompt in -> last token out, seconds."""
    num_pending_tokens: int = 0
    """Tokens after the hit that a prefetch was still reading from L3 at the lookup
    (``LookupResult.num_pending_pages``; best_effort and timeout policies)."""
    num_load_failed_tokens: int = 0
    """Tokens the cache hit but whose load failed (LoadError): recomputed, not counted
    in ``num_cached_tokens``."""

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens


class PageAllocator:
    """A free list of device page ids. Order is LIFO: recently freed pages are reused first."""

    __slots__ = ("num_pages", "_free", "_is_used")

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first
        self._is_used = np.zeros(num_pages, dtype=bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` pages; raise EngineError (and take none) if fewer are free."""
        if num > len(self._free):
            raise EngineError(
                f"need {num} device pages, {len(self._free)} of {self.num_pages} are free; "
                f"raise num_device_pages or shorten the request"
            )
        pages = [self._free.pop() for _ in range(num)]
        self._is_used[pages] = True
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Return pages taken by ``allocate``; raise EngineError on a page that is not in use."""
        for page in pages:
            if not self._is_used[page]:
                raise EngineError(f"device page {page} is freed but was not allocated")
            self._is_used[page] = False
            self._free.append(page)

    def check_integrity(self) -> None:
        free = np.zeros(self.num_pages, dtype=bool)
        free[self._free] = True
        if len(set(self._free)) != len(self._free) or np.any(free == self._is_used):
            raise AssertionError("PageAllocator: free list and used map disagree")


@dataclass(frozen=True)
class _Prefix:
    """The part of a prompt served by the cache in one request."""

    num_pages: int = 0
    num_l2_pages: int = 0
    num_l3_pages: int = 0
    num_pending_pages: int = 0
    num_load_failed_pages: int = 0

    def cut(self, num_pages: int) -> "_Prefix":
        """This prefix ending after ``num_pages`` pages (a failed load's good part)."""
        keep = min(num_pages, self.num_pages)
        num_l2 = min(self.num_l2_pages, keep)
        return replace(self, num_pages=keep, num_l2_pages=num_l2, num_l3_pages=keep - num_l2,
                       num_load_failed_pages=self.num_load_failed_pages + self.num_pages - keep)


@dataclass(eq=False)
class RunningRequest:
    """A request between ``ReferenceEngine.start`` and ``finish``: it holds its device
    pages, its prefill progress, its outputs so far, and what the cache served its prompt."""

    prompt: list[int]
    max_new_tokens: int
    pages: list[int]
    page_table: torch.Tensor
    prefix: _Prefix
    tokens: list[int]
    """Generated token ids so far (the first comes from prefill)."""
    logits: list[torch.Tensor]
    started_at: float
    """``clock`` time ``begin`` was called."""
    first_token_at: float
    """``clock`` time the first token was ready (after prefill, before the store)."""
    clock: Callable[[], float] = time.perf_counter
    prompt_tensor: torch.Tensor | None = None
    chunks: list[tuple[int, int]] = field(default_factory=list)
    """Prefill chunks [start, stop) still to compute from ``num_chunks_done`` on."""
    num_chunks_done: int = 0
    lookup: LookupResult | None = None
    """The cache lease, held from ``start`` until the prefill's last chunk."""
    handle: LoadHandle | None = None
    is_freed: bool = False
    split_at: int = 0

    @property
    def is_prefilled(self) -> bool:
        return bool(self.tokens)

    @property
    def is_finished(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens


class ReferenceEngine:
    """One model, one device KV pool, an optional cache. ``generate`` runs one request to
    its end; ``begin`` / ``decode_step`` / ``finish`` run it in steps, so that a scheduler
    (decoder.scheduler) can interleave the decode steps of several requests."""

    def __init__(
        self, model: ReferenceDecoder, layout: KVLayout, num_device_pages: int,
        cache: CacheClient | None = None, prefill_chunk_len: int | None = None,
    ) -> None:
        """``prefill_chunk_len``: tokens per prefill chunk, a multiple of the page size;
        None is one page per chunk (the bit-exact default, see the module doc)."""
        model.check_layout(layout)
        if not isinstance(num_device_pages, int) or num_device_pages <= 0:
            raise EngineError(f"num_device_pages must be a positive int, got {num_device_pages!r}")
        chunk = layout.page_size if prefill_chunk_len is None else prefill_chunk_len
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0 or chunk % layout.page_size:
            raise EngineError(
                f"prefill_chunk_len must be a positive multiple of the page size "
                f"({layout.page_size}), got {prefill_chunk_len!r}"
            )
        self.prefill_chunk_len = chunk
        self.model = model
        self.layout = layout
        self.kv_pool = torch.zeros(
            layout.pool_shape(num_device_pages), dtype=layout.torch_dtype, device=model.device
        )
        self.allocator = PageAllocator(num_device_pages)
        self.cache: CacheClient | None = None
        self.attach_cache(cache)

    def attach_cache(self, cache: CacheClient | None) -> None:
        """Use ``cache`` from the next request on (None: no cache). A cache that copies
        into this engine's pool needs ``self.kv_pool``, so it may be connected after
        the engine is built and attached here."""
        cache_layout = getattr(cache, "layout", None)
        if cache_layout is not None and cache_layout.fingerprint() != self.layout.fingerprint():
            raise EngineError(
                f"the cache's layout {cache_layout.fingerprint()} differs from the engine's "
                f"{self.layout.fingerprint()}"
            )
        self.cache = cache

    def generate(
        self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, split_at: int = 0,
    ) -> GenerationResult:
        """Prefill ``prompt`` (loading its cached prefix) and decode ``max_new_tokens`` greedily.

        ``split_at`` (a multiple of the page size) also starts a prefill chunk there: a
        cache-off run that reproduces a cache run whose hit ended at ``split_at``."""
        request = self.begin(prompt, max_new_tokens, split_at)
        try:
            while not request.is_finished:
                self.decode_step(request)
        except BaseException:
            self.abort(request)
            raise
        return self.finish(request)

    # ---- one request in steps (the scheduler's interface) ---------------------
    def num_pages_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """Device pages a request holds from ``begin`` to ``finish``: KV is written for every
        position that is fed, the prompt and all outputs but the last."""
        return -(-(prompt_len + max_new_tokens - 1) // self.layout.page_size)

    def begin(
        self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, split_at: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> RunningRequest:
        """``start`` and every ``prefill_step``: the first token is ready on return."""
        request = self.start(prompt, max_new_tokens, split_at, clock)
        try:
            while not self.prefill_step(request):
                pass
        except BaseException:
            self.abort(request)
            raise
        return request

    def start(
        self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, split_at: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> RunningRequest:
        """Allocate the request's device pages, look its prompt up in the cache (leasing the
        cached prefix) and start loading it; no compute yet. The pages (and the lease, until
        the prefill's last chunk) are held until ``finish`` or ``abort``; on an error nothing
        is held. ``clock`` stamps the request's times (a scheduler passes its own)."""
        tokens = self.check_request(prompt, max_new_tokens)
        P = self.layout.page_size
        if not isinstance(split_at, int) or split_at < 0 or split_at % P:
            raise EngineError(f"split_at must be a multiple of the page size ({P}), got {split_at!r}")
        started = clock()
        pages = self.allocator.allocate(self.num_pages_for(len(tokens), max_new_tokens))
        device = self.model.device
        request = RunningRequest(
            tokens, max_new_tokens, pages, torch.tensor(pages, dtype=torch.long, device=device),
            _Prefix(), [], [], started, float("nan"), clock,
            prompt_tensor=torch.tensor(tokens, dtype=torch.long, device=device), split_at=split_at)
        try:
            if self.cache is not None:
                self._lookup_and_load(request)
            first = request.prefix.num_pages * P
            request.chunks = chunk_bounds(first, len(tokens), self.prefill_chunk_len, split_at)
            if not request.chunks:
                raise EngineError("internal: no prefill chunk (the last page is always recomputed)")
        except BaseException:
            self.abort(request)
            raise
        return request

    def prefill_step(self, request: RunningRequest) -> bool:
        """Prefill the request's next chunk (module doc). After the last one the first token
        is ready (``first_token_at``), then the prompt's full pages are stored and the lease
        ends. Returns True once prefilled. On an error, ``abort`` the request."""
        if request.is_prefilled or request.is_freed:
            raise EngineError("prefill_step on a request that is prefilled or freed")
        lo, hi = request.chunks[request.num_chunks_done]
        # Only the first computed chunk waits per layer: its waits cover every layer.
        wait = request.handle.wait_layer if request.handle is not None and not request.num_chunks_done else None
        try:
            hidden = self.model.forward_hidden(request.prompt_tensor[lo:hi], lo, self.kv_pool,
                                               self.layout, request.page_table, wait)
            request.num_chunks_done += 1
            if request.num_chunks_done < len(request.chunks):
                return False
            # Only the last row is projected; always so, so cache on and off stay bit-equal.
            logits = self.model.compute_logits(hidden[-1:])[0]
            if request.handle is not None:
                request.handle.verify()   # nothing computed from a bad page is kept
        except LoadError as err:
            self._recompute_from(request, err)
            return False
        self._synchronize()
        request.first_token_at = request.clock()
        request.tokens.append(int(logits.argmax()))
        request.logits.append(logits)
        self._store_and_release(request)
        return True

    def decode_step(self, request: RunningRequest) -> int:
        """Feed the last output token and append the next one (greedy); returns it."""
        if request.is_finished or request.is_freed or not request.is_prefilled:
            raise EngineError("decode_step on a request that is not prefilled, finished or freed")
        position = len(request.prompt) + len(request.tokens) - 1
        fed = torch.tensor(request.tokens[-1:], dtype=torch.long, device=self.model.device)
        logits = self.model.forward_chunk(fed, position, self.kv_pool, self.layout, request.page_table)[0]
        request.tokens.append(int(logits.argmax()))
        request.logits.append(logits)
        return request.tokens[-1]

    def finish(self, request: RunningRequest) -> GenerationResult:
        """Free the request's device pages and return its output (all tokens decoded)."""
        if not request.is_finished:
            raise EngineError(
                f"finish after {len(request.tokens)} of {request.max_new_tokens} tokens; "
                f"call decode_step until is_finished (or abort)")
        self._synchronize()
        total = request.clock() - request.started_at
        self.abort(request)
        P, prefix = self.layout.page_size, request.prefix
        cached = prefix.num_pages * P
        return GenerationResult(
            prompt_len=len(request.prompt),
            tokens=list(request.tokens),
            logits=torch.stack(request.logits).float().cpu(),
            ttft_s=request.first_token_at - request.started_at,
            num_cached_tokens=cached,
            num_l2_tokens=prefix.num_l2_pages * P,
            num_l3_tokens=prefix.num_l3_pages * P,
            num_computed_tokens=len(request.prompt) - cached,
            total_s=total,
            num_pending_tokens=prefix.num_pending_pages * P,
            num_load_failed_tokens=prefix.num_load_failed_pages * P,
        )

    def abort(self, request: RunningRequest) -> None:
        """End the request's lease, if still held, and free its device pages (its output so
        far is dropped). Idempotent."""
        if request.is_freed:
            return
        request.is_freed = True
        try:
            if request.lookup is not None and self.cache is not None:
                lookup, request.lookup = request.lookup, None
                self.cache.release(lookup)
        finally:
            self.allocator.free(request.pages)

    # ---- the cache around prefill ---------------------------------------------
    def _recompute_from(self, request: RunningRequest, err: LoadError) -> None:
        """A load could not vouch for its pages from ``err.first_bad_page`` on: the prefix
        ends before that page and prefill starts again there (the pages before it were
        copied whole, the module doc's exactness holds for the new boundary)."""
        P = self.layout.page_size
        request.prefix = request.prefix.cut(err.first_bad_page)
        log.warning("cache load failed (%s); recomputing the prompt from token %d", err,
                    request.prefix.num_pages * P)
        request.handle = None
        request.chunks = chunk_bounds(request.prefix.num_pages * P, len(request.prompt),
                                      self.prefill_chunk_len, request.split_at)
        request.num_chunks_done = 0

    def _lookup_and_load(self, request: RunningRequest) -> None:
        """Lease the cached prefix and start loading it into the request's pages."""
        cache = self.cache
        request.lookup = result = cache.lookup(request.prompt)
        request.prefix = _used_prefix(result, len(request.prompt), self.layout.page_size)
        if result.num_hit_pages:
            # load wants every leased page; a dropped last page is loaded and then
            # overwritten by its recompute with the same bits (after wait_layer).
            try:
                request.handle = cache.load(result, request.pages[: result.num_hit_pages])
            except LoadError as err:
                request.prefix = request.prefix.cut(err.first_bad_page)
                log.warning("cache load refused (%s); recomputing the prompt", err)

    def _store_and_release(self, request: RunningRequest) -> None:
        """Store the prompt's full pages (only KV computed by prefill), then end the lease."""
        if self.cache is None or request.lookup is None:
            return
        lookup, request.lookup = request.lookup, None
        try:
            num_full = len(request.prompt) // self.layout.page_size
            if num_full:
                self.cache.store(request.prompt[: num_full * self.layout.page_size], request.pages[:num_full])
        finally:
            request.handle = None
            self.cache.release(lookup)

    # ---- helpers -------------------------------------------------------------
    def check_request(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int) -> list[int]:
        """The prompt as a list of ints; raise EngineError if this engine cannot run it."""
        tokens = [int(t) for t in np.asarray(prompt).reshape(-1)]
        config = self.model.config
        if not tokens:
            raise EngineError("prompt must hold at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if min(tokens) < 0 or max(tokens) >= config.vocab_size:
            raise EngineError(
                f"token ids must be in [0, {config.vocab_size}), got [{min(tokens)}, {max(tokens)}]"
            )
        if len(tokens) + max_new_tokens > config.max_positions:
            raise EngineError(
                f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_positions ({config.max_positions})"
            )
        return tokens

    def _synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)


def chunk_bounds(first: int, end: int, chunk_len: int, split_at: int = 0) -> list[tuple[int, int]]:
    """Prefill chunks [start, stop) covering ``first .. end``: ``chunk_len`` tokens each, counted
    from ``first`` and again from ``split_at`` when it falls inside (see the module doc)."""
    cuts = [first] + ([split_at] if first < split_at < end else []) + [end]
    return [
        (start, min(start + chunk_len, stop))
        for lo, stop in zip(cuts, cuts[1:])
        for start in range(lo, stop, chunk_len)
    ]


def _used_prefix(result: LookupResult, prompt_len: int, page_size: int) -> _Prefix:
    """The cached pages this request uses: all hits, less the last one when they cover the
    whole prompt (its last page is recomputed so that there are logits for token 1)."""
    num_hit = result.num_hit_pages
    if result.page_size != page_size:
        raise EngineError(f"cache pages hold {result.page_size} tokens, the engine's {page_size}")
    if num_hit * page_size > prompt_len:
        raise EngineError(
            f"cache returned {num_hit} pages of {result.page_size} for a prompt of {prompt_len} tokens"
        )
    num_used = num_hit - 1 if num_hit and num_hit * page_size == prompt_len else num_hit
    num_l2 = min(result.num_l2_pages, num_used)
    return _Prefix(num_pages=num_used, num_l2_pages=num_l2, num_l3_pages=num_used - num_l2,
                   num_pending_pages=getattr(result, "num_pending_pages", 0))
