"""Prefix-aware eviction by learned hit density: each reuse class keeps its pages as long as pays.

Idea from LHD (Beckmann, Chen and Cidon, NSDI 2018): a page's worth is its
*hit density*, the hits it can still earn per unit of cache space-time, and
that depends on what is known about it (here: how often it was referenced
before) and on its age. Pages of one class are exchangeable to an online
policy, so the best it can do with a class is keep its pages up to some age
and give them up after; which ages pay is read from the reuse intervals the
workload shows, not fixed in advance::

    class c = min(previous references of the page, 3)   (0: never seen before)
    for each class, a histogram of reuse intervals L (references between a
    page's use and its next use), learned as the tier runs, including
    intervals of pages already evicted (a ghost history remembers their
    class and last use) and "no reuse within the history" (censored)

    keeping class c pages until age T costs  sum min(L, T)  page-references
                                    and earns  #{L <= T}  hits

    every capacity/2 references (512 at least): spend the budget
    (capacity x references) on the (class, T) steps of best hits per
    page-reference first (upper concave hull per class, greedy across
    classes): T_c per class

    a page used at time t expires at t + T_c; the leaf (see
    :mod:`kvstore.eviction.chain`) that expires first is evicted first

With every T_c equal this is prefix-aware LRU, which it is until the first
fit. On chat traffic it learns that a page seen for the first time is rarely
reused (T_0 near 0: in effect admission control) while a page reused once is
reused again after a long think time (T_1 large).

Where it stands (bench/hitrate.py, issue 4's note): far above every other
policy where the tier is small against the reuse set (conversation trace at
1,000 and 5,000 pages: 0.40x and 0.50x of Belady against prefix-slru's 0.26x
and 0.42x); level with prefix-slru at 10,000; at 50,000 pages a few hits in
100,000 below LRU, and on agent sessions at 5,000 pages within noise of LRU
(from 0.5 points below to 0.3 above with small changes to the fit). Not the
default for those two reasons.

Three details keep the plan honest where its model (pages independent, the
past like the future) is off:

- every fit applies the new ages to the cached pages too, so a page's expiry
  never depends on when it was last used relative to a fit (with one class
  the policy is exactly prefix-aware LRU);
- a page is counted "not reused" when it is evicted and taken back out if it
  returns from the ghost history, so intervals still open do not make a class
  look better than it is;
- the budget is scaled by feedback: if more than half of the victims leave
  before their expiry (the plan overcommits: parents pinned by their
  children, drift) the budget shrinks, if fewer, it grows (2**(+-1/8) per fit
  at most; of the gains tried, 2**(+-1/2) oscillates and 2**(+-1/16) leaves
  the agent workload at 5,000 pages 0.5 points below LRU).

Priorities are ``(expiry, last use)``, earliest first; within a class that is
last-use order, so one heap of last uses per class holds them and a fit
re-keys nothing (it changes T_c, the offset of the class). Histograms decay
by half every 16 fits (8 x capacity references), so the policy follows a
workload that changes. What it costs: one dict entry per cached or
remembered page, O(log n) per reference, and a victim is the best of four
class heads.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from typing import Callable

from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey

_BUCKETS_PER_OCTAVE = 4
_NUM_BUCKETS = 40 * _BUCKETS_PER_OCTAVE  # intervals up to 2**40 references
_DECAY = 0.5 ** (1 / 16)  # per fit: counts halve every 16 fits (8 x capacity references)
# Upper edge of each interval bucket: an interval L lands in bucket
# floor(4 * log2(L)), so L <= _EDGES[bucket].
_EDGES = [2 ** ((b + 1) / _BUCKETS_PER_OCTAVE) for b in range(_NUM_BUCKETS)]


def _bucket(interval: int) -> int:
    return min(int(_BUCKETS_PER_OCTAVE * math.log2(interval)), _NUM_BUCKETS - 1)


def _hull_steps(counts: list[float], censored: float) -> list[tuple[float, float, float]]:
    """(cost, hits, T) steps of one class's upper concave hull, best hits per cost first.

    Keeping the class's pages until age T = _EDGES[b] earns the intervals of
    buckets <= b and costs each interval min(L, T) page-references (an interval
    is charged its bucket's upper edge, a slight overestimate).
    """
    total = sum(counts) + censored
    points = [(0.0, 0.0, 0.0)]  # (cost, hits, T), cumulative
    hits = cost_done = 0.0
    for b, count in enumerate(counts):
        if not count:
            continue
        hits += count
        cost_done += count * _EDGES[b]
        point = (cost_done + (total - hits) * _EDGES[b], hits, _EDGES[b])
        while len(points) >= 2 and _is_under(points[-2], points[-1], point):
            points.pop()
        points.append(point)
    return [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in zip(points, points[1:])]


def _is_under(a: tuple, b: tuple, c: tuple) -> bool:
    """Whether ``b`` lies on or under the segment a-c (so it is not on the upper hull)."""
    return (b[1] - a[1]) * (c[0] - a[0]) <= (c[1] - a[1]) * (b[0] - a[0])


def fit_retention(counts: list[list[float]], censored: list[float], budget: float) -> list[float]:
    """Keep-until ages T_c that earn the most hits for ``budget`` page-references.

    Greedy over the steps of every class's hull, best hits per page-reference
    first; the step that crosses the budget is taken in proportion to what is
    left. A class with no step taken gets 0 (its pages go first).
    """
    steps = []
    for c, (class_counts, class_censored) in enumerate(zip(counts, censored)):
        start = 0.0
        for cost, hits, age in _hull_steps(class_counts, class_censored):
            if cost > 0:
                steps.append((hits / cost, cost, c, start, age))
            start = age
    steps.sort(key=lambda s: -s[0])
    retention = [0.0] * len(counts)
    for _, cost, c, start, age in steps:
        if budget >= cost:
            retention[c] = age
            budget -= cost
        else:  # the step that crosses the budget: as far as the budget goes
            retention[c] = start + (age - start) * budget / cost
            break
    return retention


class PrefixLHDPolicy(EvictionPolicy):
    """Learned keep-until ages per reuse class, leaves of the page chains only (module docstring).

    Layout: a page's priority is ``(last use + T_c, last use)``, and within
    one class that is last-use order, so each class keeps a min-heap of
    ``(last use, key)`` and the victim is the best of the class heads. A fit
    changes only ``T_c``: nothing is re-keyed. Heap entries go stale (the page
    was used again, left, or gained a child) and are dropped when they reach
    the top; a page is pushed again when it is used as a leaf or its last
    cached child leaves.
    """

    name = "prefix-lhd"

    def __init__(self, num_classes: int = 4, history_factor: float = 4.0) -> None:
        if num_classes < 1 or history_factor < 0:
            raise ValueError("num_classes must be >= 1 and history_factor >= 0 (x capacity)")
        self._num_classes, self._history_factor = num_classes, history_factor
        self._clock = 0
        # key -> stamp = last use * num_classes + class at that use, for cached pages;
        # the ghost history keeps the stamps of evicted pages, oldest first.
        self._stamp: dict[PageKey, int] = {}
        self._ghost: OrderedDict[PageKey, int] = OrderedDict()
        self._heaps: list[list[tuple[int, PageKey]]] = [[] for _ in range(num_classes)]
        # Chains: key -> parent for keys inserted (or linked) under a cached parent,
        # and the number of cached children of each page that has any. A removed
        # page's children become roots; the index re-links them (on_link) if it returns.
        self._parent: dict[PageKey, PageKey] = {}
        self._num_children: dict[PageKey, int] = {}
        self._counts = [[0.0] * _NUM_BUCKETS for _ in range(num_classes)]
        self._censored = [0.0] * num_classes  # left the history without a reuse
        self._num_refs = 0.0  # decayed like the counts: the budget's time base
        # Budget feedback: the plan assumes its statistics are the tier's
        # future; where they are off (prefix pinning, drift) victims leave
        # before their expiry (budget too generous) or long after (too
        # stingy). The scale moves so that the median victim leaves on time.
        self._budget_scale = 1.0
        self._num_early = self._num_victims = 0
        self.set_capacity(4096)  # until the index says

    def set_capacity(self, capacity: int) -> None:
        self._capacity = capacity
        self._ghost_limit = int(self._history_factor * capacity)
        self._fit_period = max(capacity // 2, 512)
        self._next_fit = self._clock + self._fit_period
        self._retention = [float(capacity)] * self._num_classes  # equal: LRU until the first fit

    @property
    def retention(self) -> list[float]:
        """The keep-until age of each class (references), as last fitted. Changes nothing."""
        return list(self._retention)

    def __len__(self) -> int:
        return len(self._stamp)

    # ---- EvictionPolicy ------------------------------------------------------
    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        if parent is not None and parent in self._stamp:
            self._parent[key] = parent
            self._num_children[parent] = self._num_children.get(parent, 0) + 1
        previous = self._ghost.pop(key, None)
        if previous is not None:  # evicted, now back: counted as "no reuse", it was one
            cls = previous % self._num_classes
            self._censored[cls] = max(self._censored[cls] - 1.0, 0.0)
        self._use(key, previous)

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        # The parent, just inserted as a leaf, stops being one: its heap entry
        # goes stale (non-leaves are skipped) until its last child leaves.
        self._parent[child] = parent
        self._num_children[parent] = self._num_children.get(parent, 0) + 1

    def on_access(self, key: PageKey) -> None:
        self._use(key, self._stamp[key])

    def on_remove(self, key: PageKey) -> None:
        stamp = self._stamp.pop(key)
        self._num_children.pop(key, None)
        parent = self._parent.pop(key, None)
        left = self._num_children.get(parent, 0) - 1 if parent is not None else -1
        if left > 0:
            self._num_children[parent] = left
        elif left == 0:  # the parent is a leaf again: a candidate at its own last use
            del self._num_children[parent]
            parent_stamp = self._stamp[parent]
            heapq.heappush(self._heaps[parent_stamp % self._num_classes],
                           (parent_stamp // self._num_classes, parent))
        cls, used = stamp % self._num_classes, stamp // self._num_classes
        self._num_victims += 1
        self._num_early += used + self._retention[cls] > self._clock
        self._censored[cls] += 1.0  # until it comes back (see on_insert)
        if self._ghost_limit:
            ghost = self._ghost
            ghost[key] = stamp
            if len(ghost) > self._ghost_limit:
                ghost.popitem(last=False)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        if n == 1:  # the common case: the earliest head, without building the merge
            key = self._first_leaf()
            if key is not None and is_evictable(key):
                return [key]
        return self._choose_many(n, is_evictable, self._heads())

    # ---- victims ---------------------------------------------------------------
    def _first_leaf(self) -> PageKey | None:
        """The leaf that expires first (ties: least recently used), or None."""
        stamps, num_children, k = self._stamp, self._num_children, self._num_classes
        best, best_used, best_key = math.inf, 0, None
        for cls, (heap, age) in enumerate(zip(self._heaps, self._retention)):
            while heap:
                used, key = heap[0]
                if stamps.get(key) == used * k + cls and key not in num_children:
                    if used + age < best or (used + age == best and used < best_used):
                        best, best_used, best_key = used + age, used, key
                    break
                heapq.heappop(heap)  # stale: cleanup, not a decision
        return best_key

    def _heads(self) -> list[tuple[float, int, PageKey, int]]:
        """(expiry, last use, key, class) of each class's first live leaf, earliest first.

        Drops stale entries from the top of each heap (cleanup, not a decision).
        """
        stamps, num_children, k = self._stamp, self._num_children, self._num_classes
        heads = []
        for cls, heap in enumerate(self._heaps):
            while heap:
                used, key = heap[0]
                if stamps.get(key) == used * k + cls and key not in num_children:
                    heads.append((used + self._retention[cls], used, key, cls))
                    break
                heapq.heappop(heap)
        heads.sort()
        return heads

    def _choose_many(self, n: int, is_evictable: Callable[[PageKey], bool],
                     heads: list[tuple[float, int, PageKey, int]]) -> list[PageKey]:
        """``n`` victims or none, leaves freed by earlier victims included; changes nothing."""
        stamps, num_children, k = self._stamp, self._num_children, self._num_classes
        retention, heaps = self._retention, self._heaps
        popped: list[tuple[int, tuple[int, PageKey]]] = []  # (class, entry): pushed back
        front = list(heads)  # candidates, a heap by (expiry, last use)
        heapq.heapify(front)
        victims: list[PageKey] = []
        seen: set[PageKey] = set()
        children_left: dict[PageKey, int] = {}
        while front and len(victims) < n:
            _, used, key, cls = heapq.heappop(front)
            if cls >= 0:  # from a class heap: its next entry becomes a candidate
                heap = heaps[cls]
                popped.append((cls, heapq.heappop(heap)))
                while heap:
                    nused, nkey = heap[0]
                    if stamps.get(nkey) == nused * k + cls and nkey not in num_children:
                        heapq.heappush(front, (nused + retention[cls], nused, nkey, cls))
                        break
                    popped.append((cls, heapq.heappop(heap)))
            if key in seen or not is_evictable(key):
                continue
            seen.add(key)
            victims.append(key)
            parent = self._parent.get(key)
            if parent is not None and parent in num_children:
                left = children_left[parent] = children_left.get(parent, num_children[parent]) - 1
                if left == 0:
                    pstamp = stamps[parent]
                    pused, pcls = pstamp // k, pstamp % k
                    heapq.heappush(front, (pused + retention[pcls], pused, parent, -1))
        for cls, entry in popped:  # nothing was removed: the heaps get their entries back
            heapq.heappush(heaps[cls], entry)
        return victims if len(victims) == n else []

    # ---- learning ------------------------------------------------------------
    def _use(self, key: PageKey, previous: int | None) -> None:
        clock = self._clock = self._clock + 1
        self._num_refs += 1.0
        k = self._num_classes
        if previous is None:
            cls = 0
        else:
            prev_cls = previous % k
            self._counts[prev_cls][_bucket(clock - previous // k)] += 1.0
            cls = prev_cls + 1 if prev_cls + 1 < k else prev_cls
        self._stamp[key] = clock * k + cls
        if key not in self._num_children:  # a leaf: a candidate; a parent waits for its children
            heapq.heappush(self._heaps[cls], (clock, key))
        if clock >= self._next_fit:
            self._fit()

    def _fit(self) -> None:
        self._next_fit = self._clock + self._fit_period
        if self._num_victims:
            early = self._num_early / self._num_victims  # 0.5: the plan holds
            scale = self._budget_scale * 2 ** ((0.5 - early) / 4)
            self._budget_scale = min(max(scale, 1 / 16), 16.0)
            self._num_early = self._num_victims = 0
        self._retention = fit_retention(self._counts, self._censored,
                                        self._budget_scale * self._capacity * self._num_refs)
        for class_counts in self._counts:
            for b, count in enumerate(class_counts):
                if count:
                    class_counts[b] = count * _DECAY
        self._censored = [c * _DECAY for c in self._censored]
        self._num_refs *= _DECAY
        if sum(map(len, self._heaps)) > 4 * len(self._stamp) + 1024:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps from the live leaves (stale entries outnumber them 4 to 1)."""
        k, num_children = self._num_classes, self._num_children
        heaps: list[list[tuple[int, PageKey]]] = [[] for _ in range(k)]
        for key, stamp in self._stamp.items():
            if key not in num_children:
                heaps[stamp % k].append((stamp // k, key))
        for heap in heaps:
            heapq.heapify(heap)
        self._heaps = heaps
