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

- every fit re-keys the cached pages with the new ages, so a page's expiry
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

Priorities are ``(expiry, last use)``, earliest first. Histograms decay by
half every 16 fits (8 x capacity references), so the policy follows a
workload that changes. What it costs: one dict entry per cached or
remembered page, and every capacity/2 references an O(capacity) re-keying.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from kvstore.eviction.chain import ChainPolicy, Priority
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


class PrefixLHDPolicy(ChainPolicy):
    name = "prefix-lhd"

    def __init__(self, num_classes: int = 4, history_factor: float = 4.0) -> None:
        if num_classes < 1 or history_factor < 0:
            raise ValueError("num_classes must be >= 1 and history_factor >= 0 (x capacity)")
        super().__init__()
        self._num_classes, self._history_factor = num_classes, history_factor
        self._clock = 0
        # key -> (class at its last use, time of its last use), for cached pages
        # and for the ghost history of evicted ones.
        self._last_use: dict[PageKey, tuple[int, int]] = {}
        self._ghost: OrderedDict[PageKey, None] = OrderedDict()  # evicted keys, oldest first
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

    # ---- ChainPolicy hooks ---------------------------------------------------
    def _inserted(self, key: PageKey) -> Priority:
        previous = None
        if self._ghost.pop(key, False) is None:  # evicted, now back: its history counts
            previous = self._last_use[key]
            cls = previous[0]  # counted as "no reuse" when evicted: it was one after all
            self._censored[cls] = max(self._censored[cls] - 1.0, 0.0)
        return self._use(key, previous)

    def _accessed(self, key: PageKey, old: Priority) -> Priority:
        return self._use(key, self._last_use[key])

    def _evicted(self, key: PageKey, prio: Priority) -> None:
        self._num_victims += 1
        self._num_early += prio[0] > self._clock
        self._censored[self._last_use[key][0]] += 1.0  # until it comes back (see _inserted)
        if not self._ghost_limit:
            del self._last_use[key]
            return
        self._ghost[key] = None
        if len(self._ghost) > self._ghost_limit:
            gone, _ = self._ghost.popitem(last=False)
            del self._last_use[gone]

    # ---- learning ------------------------------------------------------------
    def _use(self, key: PageKey, previous: tuple[int, int] | None) -> Priority:
        clock = self._clock = self._clock + 1
        self._num_refs += 1.0
        if previous is None:
            cls = 0
        else:
            prev_cls, prev_time = previous
            self._counts[prev_cls][_bucket(clock - prev_time)] += 1.0
            cls = min(prev_cls + 1, self._num_classes - 1)
        self._last_use[key] = (cls, clock)
        if clock >= self._next_fit:
            self._fit()
        return (clock + self._retention[cls], clock)

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
        self._reprioritise()

    def _reprioritise(self) -> None:
        """Expiries under the new retention ages: every cached page, and the heap rebuilt."""
        retention, last_use, prio = self._retention, self._last_use, self._prio
        for key in prio:
            cls, used = last_use[key]
            prio[key] = (used + retention[cls], used)
        self._heap = [(p, k) for k, p in prio.items() if k not in self._num_children]
        heapq.heapify(self._heap)
