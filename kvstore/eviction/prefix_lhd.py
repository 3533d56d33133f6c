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

Priorities are ``(expiry, last use)``, earliest first, in one heap of the
leaves, rebuilt under the new ages at every fit. Histograms decay
by half every 16 fits (8 x capacity references), so the policy follows a
workload that changes. What it costs: one dict entry per cached or
remembered page, O(log n) per reference, and every capacity/2 references an
O(capacity) rebuild of the heap.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from itertools import compress, repeat
from typing import Callable, Sequence

import numpy as np

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

    Layout: one min-heap of ``(expiry, last use, key)`` over the leaves; an
    entry is live while the key's last use is the entry's and the key has no
    cached child, others are dropped when they reach the top. A page is
    pushed when it is used as a leaf and when its last cached child leaves.
    Every fit rebuilds the heap from the leaves under the new ages.
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
        self._heap: list[tuple[float, int, PageKey]] = []
        # After a fit the heap is rebuilt only when a victim is next asked for: a tier
        # that evicts nothing between two fits (a daemon whose pool holds its working
        # set) pays no O(pages) rebuild and no push per use. The victims are the same:
        # the rebuilt heap holds exactly the live leaves' entries, which the eager heap
        # also held (besides dead ones skipped at the top).
        self._heap_is_stale = False
        # Chains: key -> parent for keys inserted (or linked) under a cached parent,
        # and the number of cached children of each page that has any. A removed
        # page's children become roots; the index re-links them (on_link) if it returns.
        self._parent: dict[PageKey, PageKey] = {}
        self._num_children: dict[PageKey, int] = {}
        # Interval histograms, one row per class (an array: a run of uses adds to it in place).
        self._counts = np.zeros((num_classes, _NUM_BUCKETS), dtype=np.float64)
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
        self._rebuild()

    @property
    def retention(self) -> list[float]:
        """The keep-until age of each class (references), as last fitted. Changes nothing."""
        return list(self._retention)

    def __len__(self) -> int:
        return len(self._stamp)

    def pages_by_recency(self) -> list[tuple[PageKey, PageKey | None]]:
        """(page, cached parent or None) of every cached page, least recently used
        first. Changes nothing."""
        stamps, parent_of = self._stamp, self._parent
        return [(key, parent if (parent := parent_of.get(key)) in stamps else None)
                for key in sorted(stamps, key=stamps.__getitem__)]

    # ---- EvictionPolicy ------------------------------------------------------
    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        if parent is not None and parent in self._stamp:
            self._parent[key] = parent
            self._num_children[parent] = self._num_children.get(parent, 0) + 1
        previous = self._ghost.pop(key, None) if self._ghost else None
        if previous is not None:  # evicted, now back: counted as "no reuse", it was one
            cls = previous % self._num_classes
            self._censored[cls] = max(self._censored[cls] - 1.0, 0.0)
        self._use(key, previous)

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        # The parent stops being a leaf: its heap entry goes stale.
        self._parent[child] = parent
        self._num_children[parent] = self._num_children.get(parent, 0) + 1

    def on_access(self, key: PageKey) -> None:
        self._use(key, self._stamp[key])

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        """``on_access`` of each key in order, batched between fits (same effect)."""
        if len(set(keys)) != len(keys):  # a key used twice sees its own first use
            return super().on_access_run(keys)
        i, n = 0, len(keys)
        while i < n:
            end = min(n, i + max(self._next_fit - self._clock, 1))
            seg = keys[i:end]
            self._use_run(seg, np.fromiter(map(self._stamp.__getitem__, seg), np.int64, len(seg)))
            i = end

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        """``on_insert`` of each key in order (each under the one before), batched between
        fits. A page is pushed on the heap only if it is still a leaf once its chain is
        in: the entries per-key inserts push for the others are dead on arrival."""
        if len(set(keys)) != len(keys):
            return super().on_insert_run(keys, parent)
        i, n = 0, len(keys)
        while i < n:
            end = min(n, i + max(self._next_fit - self._clock, 1))
            self._insert_links(keys[i:end], parent if i == 0 else keys[i - 1])
            i = end

    def _insert_links(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        num_children = self._num_children
        if parent is not None and parent in self._stamp:
            self._parent[keys[0]] = parent
            num_children[parent] = num_children.get(parent, 0) + 1
        self._parent.update(zip(keys[1:], keys))
        num_children.update(zip(keys[:-1], repeat(1)))  # new pages: one child each, the next
        prev = np.full(len(keys), -1, dtype=np.int64)
        if self._ghost:
            back = list(map(self._ghost.pop, keys, repeat(None)))
            for j, previous in enumerate(back):
                if previous is not None:  # evicted, now back: counted as "no reuse", it was one
                    cls = previous % self._num_classes
                    self._censored[cls] = max(self._censored[cls] - 1.0, 0.0)
                    prev[j] = previous
        self._use_run(keys, prev)

    def on_remove(self, key: PageKey) -> None:
        k, num_children = self._num_classes, self._num_children
        stamp = self._stamp.pop(key)
        num_children.pop(key, None)
        parent = self._parent.pop(key, None)
        if parent is not None and parent in num_children:
            left = num_children[parent] - 1
            if left:
                num_children[parent] = left
            else:  # the parent is a leaf again, at its own last use
                del num_children[parent]
                pstamp = self._stamp[parent]
                pused = pstamp // k
                if not self._heap_is_stale:
                    heapq.heappush(self._heap, (pused + self._retention[pstamp % k], pused, parent))
        cls = stamp % k
        self._num_victims += 1
        if stamp // k + self._retention[cls] > self._clock:
            self._num_early += 1
        self._censored[cls] += 1.0  # until it comes back (see on_insert)
        if self._ghost_limit:
            ghost = self._ghost
            ghost[key] = stamp
            if len(ghost) > self._ghost_limit:
                ghost.popitem(last=False)

    def on_remove_many(self, keys: Sequence[PageKey]) -> None:
        """``on_remove`` of each key in order, in one loop over local names (an
        eviction's victims: the same steps, without a call per page)."""
        k, num_children, stamps, parents = self._num_classes, self._num_children, self._stamp, self._parent
        retention, censored, clock, heap = self._retention, self._censored, self._clock, self._heap
        ghost, ghost_limit = self._ghost, self._ghost_limit
        num_early = 0
        for key in keys:
            stamp = stamps.pop(key)
            num_children.pop(key, None)
            parent = parents.pop(key, None)
            if parent is not None and parent in num_children:
                left = num_children[parent] - 1
                if left:
                    num_children[parent] = left
                else:  # the parent is a leaf again, at its own last use
                    del num_children[parent]
                    if not self._heap_is_stale:
                        pstamp = stamps[parent]
                        pused = pstamp // k
                        heapq.heappush(heap, (pused + retention[pstamp % k], pused, parent))
            cls = stamp % k
            if stamp // k + retention[cls] > clock:
                num_early += 1
            censored[cls] += 1.0  # until it comes back (see on_insert)
            if ghost_limit:
                ghost[key] = stamp
                if len(ghost) > ghost_limit:
                    ghost.popitem(last=False)
        self._num_victims += len(keys)
        self._num_early += num_early

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        if self._heap_is_stale:
            self._rebuild()
        heap, stamps, num_children, k = self._heap, self._stamp, self._num_children, self._num_classes
        while heap:  # drop dead entries from the top (cleanup, not a decision)
            _, used, key = heap[0]
            stamp = stamps.get(key)
            if stamp is not None and stamp // k == used and key not in num_children:
                if n == 1 and is_evictable(key):
                    return [key]  # the common case
                break
            heapq.heappop(heap)
        return self._choose_many(n, is_evictable)

    def _choose_many(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        """``n`` victims or none, leaves freed by earlier victims included; changes nothing."""
        heap, stamps, num_children, k = self._heap, self._stamp, self._num_children, self._num_classes
        extra: list[tuple[float, int, PageKey]] = []  # parents freed by earlier victims
        popped, victims, seen = [], [], set()
        children_left: dict[PageKey, int] = {}
        while len(victims) < n:
            if extra and (not heap or extra[0] < heap[0]):
                entry, from_heap = heapq.heappop(extra), False
            elif heap:
                entry, from_heap = heapq.heappop(heap), True
            else:
                break
            if from_heap:
                popped.append(entry)
            _, used, key = entry
            stamp = stamps.get(key)
            if (key in seen or stamp is None or stamp // k != used
                    or (from_heap and key in num_children)):
                continue  # stale or duplicate entry, or not a leaf
            seen.add(key)
            if not is_evictable(key):
                continue
            victims.append(key)
            parent = self._parent.get(key)
            if parent is not None and parent in num_children:
                left = children_left[parent] = children_left.get(parent, num_children[parent]) - 1
                if left == 0:
                    pstamp = stamps[parent]
                    pused = pstamp // k
                    heapq.heappush(extra, (pused + self._retention[pstamp % k], pused, parent))
        for entry in popped:  # nothing was removed: the heap gets its entries back
            heapq.heappush(heap, entry)
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
            self._counts[prev_cls, _bucket(clock - previous // k)] += 1.0
            cls = prev_cls + 1 if prev_cls + 1 < k else prev_cls
        self._stamp[key] = clock * k + cls
        if key not in self._num_children and not self._heap_is_stale:  # a leaf: a candidate
            heapq.heappush(self._heap, (clock + self._retention[cls], clock, key))
        if clock >= self._next_fit:
            self._fit()

    def _use_run(self, keys: Sequence[PageKey], prev: np.ndarray) -> None:
        """``_use(key, previous stamp)`` for distinct keys, in order, as array work
        (``prev[j]`` is -1 for a key with no previous use)::

            key j:  clock c0+1+j,  interval c0+1+j - used_j,  class min(prev class+1, k-1) or 0
        """
        m, k, c0 = len(keys), self._num_classes, self._clock
        stamps = self._stamp
        clocks = np.arange(c0 + 1, c0 + m + 1, dtype=np.int64)
        seen = prev >= 0
        prev_cls = np.where(seen, prev % k, -1)
        if seen.any():
            used = prev[seen] // k
            buckets = np.minimum((_BUCKETS_PER_OCTAVE * np.log2(clocks[seen] - used)).astype(np.int64),
                                 _NUM_BUCKETS - 1)
            np.add.at(self._counts, (prev_cls[seen], buckets), 1.0)  # one add per use, in order: as _use
        # += 1.0 per use, in order (so the float result is _use's; cheaper than numpy for a run)
        num_refs = self._num_refs
        for _ in repeat(None, m):
            num_refs += 1.0
        self._num_refs = num_refs
        new = clocks * k + np.minimum(prev_cls + 1, k - 1)  # (no previous use: class 0)
        stamps.update(zip(keys, new.tolist()))
        self._clock = clock = c0 + m
        num_children, retention, heap = self._num_children, self._retention, self._heap
        if self._heap_is_stale:   # rebuilt with every leaf before the next victim
            if clock >= self._next_fit:
                self._fit()
            return
        is_parent = np.fromiter(map(num_children.__contains__, keys), dtype=bool, count=m)
        for j in np.flatnonzero(~is_parent).tolist():  # leaves: candidates, as in _use
            used = c0 + 1 + j
            heapq.heappush(heap, (used + retention[int(new[j]) % k], used, keys[j]))
        if clock >= self._next_fit:
            self._fit()

    def _fit(self) -> None:
        self._next_fit = self._clock + self._fit_period
        if self._num_victims:
            early = self._num_early / self._num_victims  # 0.5: the plan holds
            scale = self._budget_scale * 2 ** ((0.5 - early) / 4)
            self._budget_scale = min(max(scale, 1 / 16), 16.0)
            self._num_early = self._num_victims = 0
        self._retention = fit_retention(self._counts.tolist(), self._censored,
                                        self._budget_scale * self._capacity * self._num_refs)
        self._counts *= _DECAY   # elementwise, the product the per-count loop made
        self._censored = [c * _DECAY for c in self._censored]
        self._num_refs *= _DECAY
        self._heap_is_stale = True   # rebuilt under the new ages when a victim is asked for

    def _rebuild(self) -> None:
        """The heap from the live leaves, under the ages just fitted: O(cached pages)."""
        k, stamps, num_children = self._num_classes, self._stamp, self._num_children
        # As arrays: (used + retention[class], used, key) of each leaf, in the map's order.
        leaf = ~np.fromiter(map(num_children.__contains__, stamps), dtype=bool, count=len(stamps))
        stamp = np.fromiter(stamps.values(), dtype=np.int64, count=len(stamps))[leaf]
        used = stamp // k
        expiry = used + np.asarray(self._retention, dtype=np.float64)[stamp % k]
        keys = list(compress(stamps, leaf.tolist()))
        heap = list(zip(expiry.tolist(), used.tolist(), keys))
        heapq.heapify(heap)
        self._heap = heap
        self._heap_is_stale = False
