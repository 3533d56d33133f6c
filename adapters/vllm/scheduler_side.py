"""The scheduler side of the vLLM connector: hits, and the pages each step loads and saves.

vLLM's scheduler calls, for a waiting request (new, or resumed after preemption)::

    get_num_new_matched_tokens(request, local_hit)   local_hit: vLLM's own prefix-cache
                                                     hit, whole blocks; may repeat
    (allocates blocks for local hit + external hit + the step's tokens)
    update_state_after_alloc(request, blocks, num_external_tokens)
    ... request.num_computed_tokens is set only after this call ...
    build_connector_meta(scheduler_output)           once per step, every request in it

So the load's first page comes from the ``local_hit`` that vLLM passed (remembered
per request), never from ``request.num_computed_tokens``. Saves follow the steps:
each step's ``num_computed_tokens`` and scheduled tokens give the prompt pages it
completes, with the request's block list kept from ``NewRequestData.block_ids``,
``CachedRequestData.new_block_ids`` (appended) and, for resumed requests, replaced.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from adapters.keyed import KeyedCache
from adapters.vllm.keys import mm_spans_of, request_ids
from adapters.vllm.plan import PageTransfer, PrefillChunk, StepPlan
from adapters.vllm.prefill_timing import PrefillSample
from kvstore.page_keys import PageKey

KeysOf = Callable[[PageTransfer], list[PageKey]]


class StepPlanner:
    """Scheduler-side state of the connector (one per engine; vLLM calls it from one thread)."""

    def __init__(self, cache: KeyedCache, page_size: int, keys_of: KeysOf,
                 async_lookup: bool = False) -> None:
        self._cache, self._page_size, self._keys_of = cache, page_size, keys_of
        self._executor = ThreadPoolExecutor(1, "kvstore-lookup") if async_lookup else None
        self._lookups: dict[str, Future] = {}
        self._local_hits: dict[str, int] = {}
        self._pending_loads: dict[str, PageTransfer] = {}
        self._requests: dict[str, Any] = {}
        self._block_ids: dict[str, list[int]] = {}

    # ---- hits -------------------------------------------------------------------------
    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int | None:
        """Tokens beyond ``num_computed_tokens`` the cache holds, whole pages only, never
        the prompt's last token (vLLM must compute it). None: ask again (async lookup)."""
        self._local_hits[request.request_id] = num_computed_tokens
        probe = self._transfer(request, len(request.prompt_token_ids or ()) - 1, (), 0)
        if len(probe.token_ids) <= num_computed_tokens:
            return 0
        keys = self._keys_of(probe)
        if self._executor is None:
            num_hit = self._cache.count_cached(keys)
        else:
            future = self._lookups.get(request.request_id)
            if future is None:
                self._lookups[request.request_id] = self._executor.submit(self._cache.count_cached, keys)
                return None
            if not future.done():
                return None
            num_hit = self._lookups.pop(request.request_id).result()
        return max(num_hit * self._page_size - num_computed_tokens, 0)

    def after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Plan the load of the external hit into the blocks that follow the local hit."""
        self._requests[request.request_id] = request
        local = self._local_hits.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            return
        P = self._page_size
        if local % P:
            raise ValueError(f"request {request.request_id}: vLLM's local hit of {local} tokens "
                             f"does not end on a page of {P} tokens")
        # Whole pages: a hit that vLLM cut inside a page (another connector capped it)
        # still loads that page; vLLM recomputes its tail over the same KV.
        end = -(-(local + num_external_tokens) // P)
        if len(block_ids) < end:
            raise ValueError(f"request {request.request_id}: vLLM allocated {len(block_ids)} "
                             f"blocks for a hit of {end} pages")
        self._pending_loads[request.request_id] = self._transfer(
            request, end * P, block_ids[:end], local // P)

    # ---- steps ------------------------------------------------------------------------
    def build(self, scheduler_output: Any) -> StepPlan:
        """This step's loads, and saves of the prompt pages the step completes."""
        plan = StepPlan(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        for req_id, num_computed in self._track_blocks(scheduler_output):
            request = self._requests.get(req_id)
            if request is None:
                continue
            end = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            prompt_len = len(request.prompt_token_ids or ())
            if num_computed < min(end, prompt_len):
                plan.prefills.append(PrefillChunk(req_id, min(end, prompt_len) - num_computed, num_computed))
            num_pages = min(end, prompt_len) // self._page_size
            first = num_computed // self._page_size
            blocks = self._block_ids.get(req_id, [])
            if num_pages > first and len(blocks) >= num_pages:
                plan.saves.append(self._transfer(request, num_pages * self._page_size,
                                                 blocks[:num_pages], first))
        return plan

    def _track_blocks(self, out: Any) -> list[tuple[str, int]]:
        """Update each scheduled request's block list; (req_id, num_computed_tokens) of each."""
        steps = []
        for new in out.scheduled_new_reqs:
            self._block_ids[new.req_id] = list(new.block_ids[0])
            steps.append((new.req_id, new.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._block_ids[req_id] = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                self._block_ids.setdefault(req_id, []).extend(new_blocks[0])
            steps.append((req_id, cached.num_computed_tokens[i]))
        return steps

    def report_prefills(self, samples: Sequence["PrefillSample"]) -> None:
        """What the workers measured (``adapters.vllm.prefill_timing``): the engine's
        prefill rate, for the ``auto`` policy of this side's lookups."""
        for s in samples:
            self._cache.report_prefill(s.num_tokens, s.num_cached, s.seconds)

    def finished(self, req_id: str) -> None:
        for table in (self._requests, self._block_ids, self._pending_loads, self._local_hits,
                      self._lookups):
            table.pop(req_id, None)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _transfer(self, request: Any, num_tokens: int, block_ids: Sequence[int],
                  first_page: int) -> PageTransfer:
        """Pages [first_page, len(block_ids)) of the request's first ``num_tokens`` tokens
        (cut to whole pages)."""
        prompt = request.prompt_token_ids or ()
        num_tokens = max(num_tokens, 0) // self._page_size * self._page_size
        lora, salt = request_ids(request)
        return PageTransfer(request.request_id, tuple(prompt[:num_tokens]), tuple(block_ids),
                            first_page, lora, salt, mm_spans_of(request))
