"""Least recently used: evict the page whose last hit or insert is oldest."""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from typing import Callable, Sequence

from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        # Oldest first; move_to_end on access keeps each operation O(1).
        self._order: OrderedDict[PageKey, None] = OrderedDict()

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._order[key] = None

    def on_access(self, key: PageKey) -> None:
        self._order.move_to_end(key)

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        deque(map(self._order.move_to_end, keys), maxlen=0)  # the loop in C

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        self._order.update(zip(keys, repeat(None)))  # new keys: appended in order

    def on_remove(self, key: PageKey) -> None:
        del self._order[key]

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        victims: list[PageKey] = []
        if n <= 0:
            return victims
        for key in self._order:
            if is_evictable(key):
                victims.append(key)
                if len(victims) == n:
                    return victims
        return []

    def __len__(self) -> int:
        return len(self._order)
