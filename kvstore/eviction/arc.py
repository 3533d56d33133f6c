"""ARC, the adaptive replacement cache (Megiddo and Modha, FAST'03).

    T1: pages seen once recently      B1: keys recently evicted from T1
    T2: pages seen at least twice     B2: keys recently evicted from T2

A hit in T1 or T2 moves the page to T2's recent end. An insert whose key is
in B1 (evicted from T1 too early) grows the target size ``p`` of T1; one in
B2 shrinks it; both go to T2. Eviction takes T1's least recent page while T1
is larger than ``p``, otherwise T2's. Ghost lists are kept to |T1|+|B1| <= c
and |T1|+|T2|+|B1|+|B2| <= 2c.

Our index evicts before it inserts and does not tell the policy which key is
coming, so the adaptation happens in ``on_insert``, one step after the
original's REPLACE; the ordering inside each list is the paper's.

Under the prefix rule (adaptive's leaf guard) a page with a cached child is
parked (:mod:`kvstore.eviction.parking`): out of T1/T2 until its last child
leaves, then back at its list's least recent end (a hit while parked moves it
to T2).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from typing import Callable, Sequence

from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.parking import park, unpark
from kvstore.page_keys import PageKey

_Queue = OrderedDict  # key -> None, least recent first


class ARCPolicy(EvictionPolicy):
    name = "arc"

    def __init__(self) -> None:
        self._capacity = 0  # 0 until set_capacity: then sizes follow the current size
        self._p = 0.0
        self._t1: _Queue[PageKey, None] = OrderedDict()
        self._t2: _Queue[PageKey, None] = OrderedDict()
        self._b1: _Queue[PageKey, None] = OrderedDict()
        self._b2: _Queue[PageKey, None] = OrderedDict()
        self._parked: dict[PageKey, int] = {}  # key -> its list: 0 T1, 1 T2

    def set_capacity(self, capacity: int) -> None:
        self._capacity = capacity

    def _c(self) -> int:
        return self._capacity or len(self)

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        b1, b2 = self._b1, self._b2
        if key in b1:
            self._p = min(float(self._c()), self._p + max(len(b2) / len(b1), 1.0))
            del b1[key]
            self._t2[key] = None
        elif key in b2:
            self._p = max(0.0, self._p - max(len(b1) / len(b2), 1.0))
            del b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None

    def on_access(self, key: PageKey) -> None:
        if key in self._parked:
            self._parked[key] = 1   # a hit: it belongs to T2
            return
        if self._t1.pop(key, False) is None:
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        if self._parked:
            return super().on_access_run(keys)
        # Each hit key ends up in T2, most recent last, in the order of its last hit.
        deque(map(self._t1.pop, keys, repeat(None)), maxlen=0)
        deque(map(self._t2.pop, keys, repeat(None)), maxlen=0)
        self._t2.update(zip(reversed(dict.fromkeys(reversed(keys))), repeat(None)))

    def park(self, key: PageKey) -> None:
        park(key, (self._t1, self._t2), self._parked)

    def unpark(self, key: PageKey) -> None:
        unpark(key, (self._t1, self._t2), self._parked)

    def on_remove(self, key: PageKey) -> None:
        queue = self._parked.pop(key, None)
        if queue is None:
            queue = 0 if self._t1.pop(key, False) is None else 1
            if queue:
                del self._t2[key]
        (self._b2 if queue else self._b1)[key] = None
        c = self._c()
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 and len(self) + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        victims: list[PageKey] = []
        t1_iter = (k for k in self._t1 if is_evictable(k))
        t2_iter = (k for k in self._t2 if is_evictable(k))
        num_t1 = len(self._t1)
        while len(victims) < n:
            prefer_t1 = num_t1 > 0 and (num_t1 > self._p or not self._t2)
            key = next(t1_iter if prefer_t1 else t2_iter, None)
            if key is None:
                key = next(t2_iter if prefer_t1 else t1_iter, None)
            if key is None:
                return []
            if key in self._t1:
                num_t1 -= 1
            victims.append(key)
        return victims

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2) + len(self._parked)
