"""Prefix-aware eviction: only leaves of the cached page chains are candidates.

Page keys are chained (key[i] names every token up to page i), so a cached page
is useful only while its whole prefix is cached too::

    sys ── a1 ── a2 ── a3        a3 and b2 are leaves: evicting a1 first would
       └── b1 ── b2              strand a2 and a3 (cached, never hit again)

:class:`ChainPolicy` keeps the parent/children links the index reports on
insert and offers only leaves (pages with no cached child) as victims, lowest
priority first; a parent becomes a candidate when its last cached child
leaves. A subclass says only how a page's priority changes on insert and
access. Priorities are ordered tuples; a min-heap with stale entries skipped
on the way out keeps each operation O(log n).
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from typing import Callable

from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey

Priority = tuple


class ChainPolicy(EvictionPolicy):
    """Leaves-only eviction ordered by a priority the subclass defines (see module docstring)."""

    def __init__(self) -> None:
        self._prio: dict[PageKey, Priority] = {}
        # key -> (parent, the parent's insert serial), for keys inserted under a
        # cached parent. A link whose parent left (or left and came back: other
        # serial) is dead; a page's children become roots when it is removed.
        self._parent: dict[PageKey, tuple[PageKey, int]] = {}
        self._serial: dict[PageKey, int] = {}  # key -> insert serial
        self._num_inserts = 0
        self._num_children: dict[PageKey, int] = {}  # only keys with cached children
        # (priority, key); an entry is live while it equals the key's priority
        # and the key is a leaf. Others are dropped when they reach the top.
        self._heap: list[tuple[Priority, PageKey]] = []

    # ---- what a subclass defines ---------------------------------------------
    @abstractmethod
    def _inserted(self, key: PageKey) -> Priority:
        """Priority of a page just inserted (lower is evicted first)."""

    @abstractmethod
    def _accessed(self, key: PageKey, old: Priority) -> Priority:
        """Priority of a page just hit, given its previous one."""

    def _evicted(self, key: PageKey, prio: Priority) -> None:
        """Hook: ``key`` with priority ``prio`` left the tier."""

    # ---- EvictionPolicy ------------------------------------------------------
    def _live_parent(self, key: PageKey) -> PageKey | None:
        link = self._parent.get(key)
        if link is None or self._serial.get(link[0]) != link[1]:
            return None
        return link[0]

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._num_inserts += 1
        self._serial[key] = self._num_inserts
        if parent is not None and parent in self._prio:
            self._parent[key] = (parent, self._serial[parent])
            self._num_children[parent] = self._num_children.get(parent, 0) + 1
        prio = self._prio[key] = self._inserted(key)
        heapq.heappush(self._heap, (prio, key))

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        # The child stops being a root; the parent, just inserted as a leaf, stops
        # being one (its heap entry goes stale: choose_victims skips non-leaves).
        self._parent[child] = (parent, self._serial[parent])
        self._num_children[parent] = self._num_children.get(parent, 0) + 1

    def on_access(self, key: PageKey) -> None:
        prio = self._prio[key] = self._accessed(key, self._prio[key])
        if key not in self._num_children:  # a leaf: push; a parent is pushed when it becomes one
            heapq.heappush(self._heap, (prio, key))

    def on_remove(self, key: PageKey) -> None:
        prio = self._prio.pop(key)
        self._num_children.pop(key, None)  # (children of a removed page become roots)
        parent = self._live_parent(key)
        del self._serial[key]
        self._parent.pop(key, None)
        if parent is not None:
            left = self._num_children[parent] - 1
            if left:
                self._num_children[parent] = left
            else:
                del self._num_children[parent]
                heapq.heappush(self._heap, (self._prio[parent], parent))
        self._evicted(key, prio)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        heap, prio_of, num_children = self._heap, self._prio, self._num_children
        while heap:  # drop dead entries from the top (cleanup, not a decision)
            prio, key = heap[0]
            if prio_of.get(key) == prio and key not in num_children:
                break
            heapq.heappop(heap)
        if n == 1 and heap and is_evictable(heap[0][1]):
            return [heap[0][1]]  # the common case, without popping and pushing back
        extra: list[tuple[Priority, PageKey]] = []  # parents freed by earlier victims of this call
        popped, victims, seen = [], [], set()
        children_left: dict[PageKey, int] = {}
        while len(victims) < n:
            if extra and (not heap or extra[0] < heap[0]):
                entry, from_heap = heapq.heappop(extra), False
            elif heap:
                entry, from_heap = heapq.heappop(heap), True
            else:
                break
            prio, key = entry
            if key in seen or prio_of.get(key) != prio or (from_heap and key in num_children):
                continue  # stale or duplicate entry, or not a leaf: dropped for good
            seen.add(key)
            if from_heap:
                popped.append(entry)
            if not is_evictable(key):
                continue
            victims.append(key)
            parent = self._live_parent(key)
            if parent is not None:
                left = children_left.get(parent, num_children[parent]) - 1
                children_left[parent] = left
                if left == 0:
                    heapq.heappush(extra, (prio_of[parent], parent))
        for entry in popped:  # the live entries go back: nothing was removed
            heapq.heappush(heap, entry)
        return victims if len(victims) == n else []

    def __len__(self) -> int:
        return len(self._prio)

    def pages_by_recency(self) -> list[tuple[PageKey, PageKey | None]]:
        """(page, cached parent or None) of every cached page, least recently used
        first (a priority's last field is the use clock). Changes nothing."""
        order = sorted(self._prio, key=lambda k: self._prio[k][-1])
        return [(key, self._live_parent(key)) for key in order]

    def _maybe_compact(self) -> None:
        """Rebuild the heap from live leaves when stale entries outnumber them 4 to 1."""
        if len(self._heap) > 4 * len(self._prio) + 1024:
            self._heap = [(p, k) for k, p in self._prio.items() if k not in self._num_children]
            heapq.heapify(self._heap)
