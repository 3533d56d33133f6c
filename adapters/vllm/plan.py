"""What the vLLM scheduler side tells the worker side each step (no vLLM import).

Index arithmetic, for one request with page (block) size P::

    tokens  [0 .... local hit | external hit ....| computed this step ....)
    pages   [0 .. first_page) [first_page ........ num_pages)
    load:   pages [first_page, num_pages) of the chain go to block_ids[first_page:num_pages]
    save:   pages [first_page, num_pages) come from block_ids[first_page:num_pages]; an
            earlier page the cache lacks is written too (its block holds its KV already)

``first_page`` of a load is the local prefix-cache hit that vLLM passed to
``get_num_new_matched_tokens`` (those blocks are vLLM's own and shared: never
written). Keys are made on each worker (its namespace: TP rank, PP stage), so
only token ids, multimodal spans, block ids, LoRA name and cache salt travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MMSpan:
    """A multimodal item behind placeholder tokens: its KV depends on ``identifier``
    (vLLM's content hash of the item), not only on the placeholder token ids."""

    offset: int
    length: int
    identifier: str


@dataclass(frozen=True)
class PageTransfer:
    """Pages [first_page, num_pages) of one request's token chain and their vLLM blocks."""

    req_id: str
    token_ids: tuple[int, ...]
    """The request's tokens up to ``num_pages * P`` (the chain the keys are made from)."""
    block_ids: tuple[int, ...]
    """vLLM block of page i, for every i < num_pages."""
    first_page: int
    lora_id: str | None = None
    cache_salt: str | None = None
    mm_spans: tuple[MMSpan, ...] = ()

    @property
    def num_pages(self) -> int:
        return len(self.block_ids)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [num_cached, num_cached + num_tokens) of one request, computed this
    step over the ``num_cached`` before them (vLLM's prefix hit, loaded pages, earlier chunks)."""

    req_id: str
    num_tokens: int
    num_cached: int


@dataclass
class StepPlan:
    """Loads to run before this step's attention, saves of pages it completes, and the
    prompt chunks it computes (the worker times steps of one chunk for the cost model)."""

    loads: list[PageTransfer] = field(default_factory=list)
    saves: list[PageTransfer] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
