"""S3-FIFO (Yang et al., SOSP'23): a small probation FIFO, a main FIFO and a ghost list.

    insert ──> small (10%) ──hit while there──> main (90%) ──hit──> reinserted
                   │ no hit                       │ no hit since last pass
                   v                              v
                 ghost (keys only) ─re-insert─> main          evicted

New pages enter the small queue; one that was hit there moves to main when it
reaches the small queue's end, one that was not is evicted and its key is
remembered in the ghost list. A page inserted while its key is a ghost goes
straight to main. Main is a FIFO with a 2-bit hit count: a page with hits is
reinserted with one hit fewer, so most one-hit pages leave after one pass
through the small queue without flushing the pages that are reused.

Under the prefix rule (adaptive's leaf guard) a page with a cached child is
parked (:mod:`kvstore.eviction.parking`): out of its queue until its last
child leaves, then back at that queue's oldest end. Without parking each eviction
stepped past every parent in main, tens of thousands of pages in a large tier
of long prompts (a store of 128 pages took ~110 ms at 32,768 pages).

Our interface splits eviction in two (``choose_victims`` names, the index
removes): the promotions and reinsertions happen in ``choose_victims``, which
the base contract allows; the ghost entry is made in ``on_remove``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.parking import park, unpark
from kvstore.page_keys import PageKey

_MAX_FREQ = 3
_BUMPED = tuple(min(f + 1, _MAX_FREQ) for f in range(_MAX_FREQ + 1))  # a hit's new count


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, small_fraction: float = 0.1) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"S3-FIFO small_fraction must be in (0, 1), got {small_fraction}")
        self._small_fraction = small_fraction
        self._capacity = 0  # 0 until set_capacity: sizes then follow the current size
        self._small: OrderedDict[PageKey, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[PageKey, None] = OrderedDict()
        self._ghost: OrderedDict[PageKey, None] = OrderedDict()
        self._freq: dict[PageKey, int] = {}
        self._parked: dict[PageKey, int] = {}  # key -> its queue: 0 small, 1 main

    def set_capacity(self, capacity: int) -> None:
        self._capacity = capacity

    def _size(self) -> int:
        return self._capacity or len(self._freq)

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._freq[key] = 0
        if self._ghost.pop(key, False) is None:
            self._main[key] = None
        else:
            self._small[key] = None

    def on_access(self, key: PageKey) -> None:
        freq = self._freq[key]
        if freq < _MAX_FREQ:
            self._freq[key] = freq + 1

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        # The loop in C; zip is lazy, so a key named twice sees its first hit.
        freq = self._freq
        freq.update(zip(keys, map(_BUMPED.__getitem__, map(freq.__getitem__, keys))))

    def park(self, key: PageKey) -> None:
        park(key, (self._small, self._main), self._parked)

    def unpark(self, key: PageKey) -> None:
        unpark(key, (self._small, self._main), self._parked)

    def on_remove(self, key: PageKey) -> None:
        del self._freq[key]
        queue = self._parked.pop(key, None)
        if queue is not None:
            if queue == 0:   # small: its key becomes a ghost, as below
                self._remember(key)
            return
        if self._small.pop(key, False) is None:
            self._remember(key)
        else:
            del self._main[key]

    def _remember(self, key: PageKey) -> None:
        """A page evicted from the small queue: its key becomes a ghost."""
        self._ghost[key] = None
        limit = self._size() - int(self._size() * self._small_fraction)
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        victims: list[PageKey] = []
        chosen: set[PageKey] = set()
        leased_small: set[PageKey] = set()  # passed over this call; no longer counted as small
        num_small_chosen = 0
        small_target = max(1, int(self._size() * self._small_fraction))
        # Each page can be passed over (promoted, reinserted, leased) a bounded
        # number of times before every candidate has been seen: stop then.
        budget = (_MAX_FREQ + 2) * (len(self._freq) + 1)
        while len(victims) < n and budget > 0:
            budget -= 1
            small_left = len(self._small) - num_small_chosen - len(leased_small)
            main_left = len(self._main) - (len(victims) - num_small_chosen)
            if small_left > 0 and (small_left >= small_target or main_left <= 0):
                key = self._step_small(chosen, leased_small, is_evictable)
                num_small_chosen += key is not None
            elif main_left > 0:
                key = self._step_main(chosen, is_evictable)
            else:
                break
            if key is not None:
                victims.append(key)
                chosen.add(key)
        return victims if len(victims) == n else []

    def _oldest(self, queue: OrderedDict[PageKey, None], chosen: set[PageKey]) -> PageKey:
        for key in queue:
            if key not in chosen:
                return key
        raise RuntimeError("S3-FIFO queue has no unchosen key")  # callers check counts

    def _step_small(
        self, chosen: set[PageKey], leased: set[PageKey], is_evictable: Callable[[PageKey], bool]
    ) -> PageKey | None:
        """Look at the oldest page of the small queue: promote it, skip it, or name it."""
        key = self._oldest(self._small, chosen | leased)
        if self._freq[key] > 0:
            del self._small[key]
            self._main[key] = None
            self._freq[key] = 0
            return None
        if not is_evictable(key):
            # Skipped for the rest of this call, so the main queue gets its turn.
            leased.add(key)
            self._small.move_to_end(key)
            return None
        return key

    def _step_main(self, chosen: set[PageKey], is_evictable: Callable[[PageKey], bool]) -> PageKey | None:
        """Look at the oldest page of main: reinsert it with one hit fewer, or name it."""
        key = self._oldest(self._main, chosen)
        freq = self._freq[key]
        if freq > 0 or not is_evictable(key):
            self._freq[key] = max(freq - 1, 0)
            self._main.move_to_end(key)
            return None
        return key

    def __len__(self) -> int:
        return len(self._freq)
