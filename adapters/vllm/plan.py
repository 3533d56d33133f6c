"""What the vLLM scheduler side tells the worker side each step (no vLLM import).

Index arithmetic, for one request with page (block) size P::

    tokens   [0 ...................... computed | external ......)   pages = tokens // P
    load:    pages [skip_pages, num_pages) of the chain go to block_ids[skip_pages:num_pages]
    save:    pages [from_page, num_pages)  of the chain come from block_ids[from_page:num_pages]

Keys are made on each worker (``page_keys`` of the token ids in that worker's
namespace: TP ranks hold different heads), so only token ids, block ids and the
request's LoRA name and cache salt travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def num_pages(self) -> int:
        return len(self.block_ids)


@dataclass
class StepPlan:
    """Loads to run before this step's attention, saves of pages it completes."""

    loads: list[PageTransfer] = field(default_factory=list)
    saves: list[PageTransfer] = field(default_factory=list)
