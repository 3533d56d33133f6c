"""Prefix-aware LRU: evict the least recently used leaf of the cached page chains.

Plain LRU, fed a request's pages in order, ranks a chain's first page as its
oldest and evicts it first, stranding the rest of the chain. Offering only
leaves (see :mod:`kvstore.eviction.chain`) turns that into "shorten the least
recently used chain from its tail", what SGLang's radix cache does.
"""

from __future__ import annotations

from kvstore.eviction.chain import ChainPolicy, Priority
from kvstore.page_keys import PageKey


class PrefixLRUPolicy(ChainPolicy):
    name = "prefix-lru"

    def __init__(self) -> None:
        super().__init__()
        self._clock = 0

    def _tick(self) -> Priority:
        self._clock += 1
        if not self._clock & 0xFFFF:
            self._maybe_compact()
        return (self._clock,)

    def _inserted(self, key: PageKey) -> Priority:
        return self._tick()

    def _accessed(self, key: PageKey, old: Priority) -> Priority:
        return self._tick()
