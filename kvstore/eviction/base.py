"""The eviction policy interface: a policy orders candidates, the index does the removing.

A policy is told about every insert, access and removal of a cached page and,
when asked, names victims. It never frees anything itself (mechanism stays in
the index and pool, see vLLM's block pool for the same split).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Sequence

from kvstore.page_keys import PageKey


class EvictionPolicy(ABC):
    """Orders the pages of one tier for eviction.

    Contract, held by tests/kvstore/test_eviction.py for every registered policy:
    - ``on_insert`` is called once per key, before any ``on_access`` of it, and
      ``on_remove`` once when it leaves the tier; a key is never inserted twice
      without a removal between.
    - ``choose_victims(n, is_evictable)`` returns exactly ``n`` distinct keys for
      which ``is_evictable`` is true, or ``[]`` when fewer than ``n`` exist. It
      adds and forgets no key and decides nothing by itself: the index calls
      ``on_remove`` for each victim it actually removes. A policy whose
      eviction reorders its own queues (S3-FIFO promotes, CLOCK advances its
      hand) may do that reordering here, but a second call with nothing
      between returns the same victims.
    - ``is_evictable`` may also offer ``count_leading(keys)``: how many of ``keys``,
      from the first, are evictable, in one call (the index's does). A policy that
      trims a run of pages may use it; per-key calls mean the same.
    - ``set_capacity`` is called once by the index before any other call;
      policies that size internal queues or ghost lists by the tier's
      capacity use it, others ignore it.
    """

    name: ClassVar[str]

    def set_capacity(self, capacity: int) -> None:
        """The tier holds at most ``capacity`` pages. Optional hook; the default ignores it."""

    @abstractmethod
    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        """``key`` entered the tier; ``parent`` is the previous page of its chain, if cached."""

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        """``parent`` just entered the tier and ``child``, cached since before, is the next
        page of its chain (the child came first: its parent had been evicted, or is
        back from L3). Optional; policies that ignore chains ignore it."""

    @abstractmethod
    def on_access(self, key: PageKey) -> None:
        """``key`` was hit (or stored again)."""

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        """Each of ``keys`` was hit, in this order (a lookup's run of pages): the same
        as ``on_access`` per key, which is what this default does. A policy whose
        per-page cost shows overrides it with batched work of the same effect."""
        on_access = self.on_access
        for key in keys:
            on_access(key)

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        """``on_insert`` of each key in order, ``keys[i]``'s parent being ``keys[i-1]``
        (the first's ``parent``, if cached): one store's new chain. This default does
        exactly that; a policy may batch it with the same effect."""
        on_insert = self.on_insert
        for key in keys:
            on_insert(key, parent)
            parent = key

    @abstractmethod
    def on_remove(self, key: PageKey) -> None:
        """``key`` left the tier (evicted or deleted)."""

    def on_remove_many(self, keys: Sequence[PageKey]) -> None:
        """``on_remove`` of each key in order (an eviction's victims). This default does
        exactly that; a policy may batch it with the same effect."""
        on_remove = self.on_remove
        for key in keys:
            on_remove(key)

    @abstractmethod
    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        """``n`` keys to evict, best first, or ``[]``; removes nothing (see the class contract)."""

    def __len__(self) -> int:  # pragma: no cover - every policy overrides
        raise NotImplementedError
