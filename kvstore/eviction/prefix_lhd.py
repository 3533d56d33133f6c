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
workload that changes.

State per run, not per page (:mod:`kvstore.eviction.use_runs`): the pages of
a run are chained, were last used at consecutive clocks and share a class, so
a lookup's stretch through a run is one histogram add of weight m (every page
of it sees the same interval) and a few assignments; the heap holds a run's
tail, and eviction trims runs from their tails. What it costs: one dict entry
per cached or remembered page, a few steps per run a lookup enters, O(log n)
per victim run, and every capacity/2 references a fit and an O(runs) rebuild
of the heap.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from itertools import repeat
from operator import itemgetter
from typing import Callable, Sequence

import numpy as np

from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.use_runs import UseRun, UseRuns
from kvstore.page_keys import PageKey, num_matching, num_walked_back

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
    return spend_budget([_hull_steps(row, cens) for row, cens in zip(counts, censored)], budget)


def spend_budget(hulls: list[list[tuple[float, float, float]]], budget: float) -> list[float]:
    """``fit_retention`` from each class's hull steps (``_hull_steps``)."""
    steps = []
    for c, hull in enumerate(hulls):
        start = 0.0
        for cost, hits, age in hull:
            if cost > 0:
                steps.append((hits / cost, cost, c, start, age))
            start = age
    steps.sort(key=lambda s: -s[0])
    retention = [0.0] * len(hulls)
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

    Layout: the cached chains as :class:`UseRuns` (runs of pages with
    consecutive last uses and one class), and one min-heap of
    ``(expiry, last use, run id)`` over the tails of runs without children
    (the leaves); an entry is live while its run is a leaf whose tail was last
    used then, others are dropped when they reach the top. So a lookup's run
    of pages costs a few steps per run, not per page, and a victim's parent,
    the page before it in its run, is the next candidate of that run. Every
    fit rebuilds the heap from the leaf runs under the new ages.
    """

    name = "prefix-lhd"

    def __init__(self, num_classes: int = 4, history_factor: float = 4.0) -> None:
        if num_classes < 1 or history_factor < 0:
            raise ValueError("num_classes must be >= 1 and history_factor >= 0 (x capacity)")
        self._num_classes, self._history_factor = num_classes, history_factor
        self._clock = 0
        self._runs = UseRuns(self._push)
        # The ghost history keeps the stamps (last use * num_classes + class) of
        # evicted pages, oldest first.
        self._ghost: OrderedDict[PageKey, int] = OrderedDict()
        self._heap: list[tuple[float, int, int]] = []
        # After a fit the heap is rebuilt only when a victim is next asked for: a tier
        # that evicts nothing between two fits (a daemon whose pool holds its working
        # set) pays no rebuild and no push per use. The victims are the same: the
        # rebuilt heap holds exactly the live leaves' entries.
        self._heap_is_stale = False
        # Interval histograms, one row per class, as fitted (decayed floats), and the
        # uses since the last fit as exact integers: a run of m uses adds m at once,
        # and the fit folds them in, so batched and per-page uses learn the same.
        self._counts = np.zeros((num_classes, _NUM_BUCKETS), dtype=np.float64)
        self._new_counts = [0] * (num_classes * _NUM_BUCKETS)  # [class * _NUM_BUCKETS + bucket]
        self._censored = [0.0] * num_classes  # left the history without a reuse
        self._new_censored = [0] * num_classes
        self._num_refs = 0.0  # decayed like the counts: the budget's time base
        self._new_refs = 0
        self._reset: set[int] = set()   # classes whose censored count was reset since the last fit
        self._hulls: list[list[tuple[float, float, float]] | None] = [None] * num_classes  # as last fitted
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

    @property
    def num_runs(self) -> int:
        """Runs (nodes) the policy keeps now. Changes nothing."""
        return len(self._runs.runs)

    def __len__(self) -> int:
        return len(self._runs)

    def pages_by_recency(self) -> list[tuple[PageKey, PageKey | None]]:
        """(page, cached parent or None) of every cached page, least recently used
        first. Changes nothing."""
        return [(key, parent) for _, key, parent in sorted(self._runs.iter_pages(), key=itemgetter(0))]

    def check(self) -> str | None:
        """What is inconsistent in the runs, or None. O(pages); for tests."""
        return self._runs.check()

    # ---- EvictionPolicy ------------------------------------------------------
    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._insert_segment([key], parent)

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        """``on_insert`` of each key in order (each under the one before): one run per
        class among them, cut where a fit falls."""
        if len(set(keys)) != len(keys):
            return super().on_insert_run(keys, parent)
        keys = keys if isinstance(keys, list) else list(keys)
        i, n = 0, len(keys)
        while i < n:
            end = min(n, i + max(self._next_fit - self._clock, 1))
            self._insert_segment(keys[i:end], parent if i == 0 else keys[i - 1])
            i = end

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        # The parent's run stops being a leaf: its heap entry goes stale.
        self._runs.link(child, parent)

    def on_access(self, key: PageKey) -> None:
        self.on_access_run([key])

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        """``on_access`` of each key in order: a step per stretch of keys that lies in
        one run, not per key."""
        keys = keys if isinstance(keys, list) else list(keys)   # (list slices compare with lists)
        runs, where, top = self._runs, self._runs.where, self._num_classes - 1
        i, n, previous = 0, len(keys), None
        while i < n:
            run, pos = where[keys[i]]
            p = pos - run.base
            m = num_matching(run.keys, p, keys, i)
            clock, cls = self._clock, run.cls
            bucket = _bucket(clock + 1 - run.used0 - p)  # one interval for all m
            if p or m < len(run.keys):
                run = runs.isolate(run, p, m)
            run.used0, run.cls = clock + 1, cls + 1 if cls < top else top
            if run.parent is not None and run.parent is previous:
                run = runs.merge_into_parent(run)
            if not run.children:
                self._push(run)   # (its tail is the stretch's last page, merged or not)
            previous = run
            i += m
            self._count_uses(cls, bucket, m)

    def _count_uses(self, cls: int, bucket: int, m: int) -> None:
        """``m`` uses of class ``cls`` pages at one interval bucket, the clock moving past
        them; each fit they cross counts those before it (as uses one at a time would)."""
        while m:
            step = min(m, max(self._next_fit - self._clock, 1))
            self._new_counts[cls * _NUM_BUCKETS + bucket] += step
            self._clock += step
            self._new_refs += step
            m -= step
            if self._clock >= self._next_fit:
                self._fit()

    def on_remove(self, key: PageKey) -> None:
        self._trim(self._runs.make_tail(key), 1)

    def on_remove_many(self, keys: Sequence[PageKey]) -> None:
        """``on_remove`` of each key in order; where the keys walk a run back from its tail
        (an eviction's victims), the run is trimmed at once."""
        keys = keys if isinstance(keys, list) else list(keys)   # (list slices compare with lists)
        runs = self._runs
        i, n = 0, len(keys)
        while i < n:
            run, p = runs.place(keys[i])
            m = 1
            if p == len(run.keys) - 1 and i + 1 < n:
                m = num_walked_back(run.keys, p, keys, i)
                self._trim(run, m)
            else:
                self._trim(runs.make_tail(keys[i]), 1)
            i += m

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        if self._heap_is_stale:
            self._rebuild()
        heap, runs = self._heap, self._runs.runs
        while heap:  # drop dead entries from the top (cleanup, not a decision)
            _, used, run_id = heap[0]
            run = runs.get(run_id)
            if run is not None and not run.children and run.tail_used == used:
                if n == 1 and is_evictable(run.keys[-1]):
                    return [run.keys[-1]]  # the common case
                break
            heapq.heappop(heap)
        return self._choose_many(n, is_evictable)

    def _choose_many(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        """``n`` victims or none, best first; changes nothing. A leaf run gives its pages
        tail first (each is the next best once the one after it goes: its last use is
        one earlier, its class the same) until one is leased; a run given up whole
        makes its parent run a candidate once all of the parent's children are."""
        heap, runs, retention = self._heap, self._runs.runs, self._retention
        count_leading = getattr(is_evictable, "count_leading", None)   # a run's pages at once
        extra: list[tuple[float, int, int]] = []  # parent runs freed by earlier victims
        popped, victims, seen = [], [], set()
        children_left: dict[int, int] = {}
        while len(victims) < n:
            if extra and (not heap or extra[0] < heap[0]):
                entry, from_heap = heapq.heappop(extra), False
            elif heap:
                entry, from_heap = heapq.heappop(heap), True
                popped.append(entry)
            else:
                break
            _, used, run_id = entry
            run = runs.get(run_id)
            if (run_id in seen or run is None or run.tail_used != used
                    or (from_heap and run.children)):
                continue  # stale or duplicate entry, or not a leaf
            seen.add(run_id)
            keys = run.keys
            j = len(keys) - 1
            if count_leading is not None and n - len(victims) > 1:
                want = min(n - len(victims), j + 1)
                tail = keys[j - want + 1:j + 1]
                tail.reverse()   # the tail first
                ok = count_leading(tail)
                victims += tail[:ok]
                j -= ok
            else:
                while j >= 0 and len(victims) < n and is_evictable(keys[j]):
                    victims.append(keys[j])
                    j -= 1
            parent = run.parent
            if j < 0 and parent is not None:
                left = children_left[parent.id] = children_left.get(parent.id, len(parent.children)) - 1
                if left == 0:
                    pused = parent.tail_used
                    heapq.heappush(extra, (pused + retention[parent.cls], pused, parent.id))
        for entry in popped:  # nothing was removed: the heap gets its entries back
            heapq.heappush(heap, entry)
        return victims if len(victims) == n else []

    # ---- learning ------------------------------------------------------------
    def _insert_segment(self, keys: list[PageKey], parent: PageKey | None) -> None:
        """New pages (a chain, each under the one before, the first under ``parent``)
        used at the next clocks; pages back from the ghost history keep their class
        count, so the chain becomes one run per stretch of equal class."""
        m, k, c0 = len(keys), self._num_classes, self._clock
        classes = None
        if self._ghost:
            back = list(map(self._ghost.pop, keys, repeat(None)))
            if back.count(None) != m:
                classes = [0] * m
                new_counts, new_censored, censored = self._new_counts, self._new_censored, self._censored
                for j, previous in enumerate(back):
                    if previous is not None:  # evicted, now back: counted as "no reuse", it was one
                        cls = previous % k
                        if censored[cls] + new_censored[cls] >= 1.0:
                            new_censored[cls] -= 1
                        else:  # what is left of it decayed away: none now
                            censored[cls], new_censored[cls] = 0.0, 0
                            self._reset.add(cls)
                        new_counts[cls * _NUM_BUCKETS + _bucket(c0 + 1 + j - previous // k)] += 1
                        classes[j] = min(cls + 1, k - 1)
        self._clock = c0 + m
        self._new_refs += m
        runs = self._runs
        if classes is None:
            run = runs.add(keys, parent, c0 + 1, 0)
        else:
            start = 0
            for end in range(1, m + 1):
                if end == m or classes[end] != classes[start]:
                    run = runs.add(keys[start:end], parent if start == 0 else keys[start - 1],
                                   c0 + 1 + start, classes[start])
                    start = end
        self._push(run)  # only the last run can be a leaf
        if self._clock >= self._next_fit:
            self._fit()

    def _trim(self, run: UseRun, m: int) -> None:
        """Remove ``run``'s last ``m`` pages: ghosts, counts and the new leaf."""
        k, cls, clock = self._num_classes, run.cls, self._clock
        first_used = run.used0 + len(run.keys) - m
        # Early victims (left before their expiry): pages used at first_used + j
        # with first_used + j + retention > clock, i.e. j > clock - retention - first_used.
        threshold = clock - self._retention[cls] - first_used
        self._num_early += m - min(max(math.floor(threshold) + 1, 0), m)
        self._num_victims += m
        self._new_censored[cls] += m  # until they come back (see _insert_segment)
        gone, leaf = self._runs.trim(run, m)
        if self._ghost_limit:
            ghost, last_used = self._ghost, first_used + m - 1
            ghost.update(zip(gone, range(last_used * k + cls, (first_used - 1) * k + cls, -k)))
            for _ in range(len(ghost) - self._ghost_limit):
                ghost.popitem(last=False)
        if leaf is not None:
            self._push(leaf)

    def _push(self, run: UseRun) -> None:
        """A heap entry for a leaf run's tail (none while the heap waits for its rebuild)."""
        if not self._heap_is_stale:
            used = run.tail_used
            heapq.heappush(self._heap, (used + self._retention[run.cls], used, run.id))

    def _fit(self) -> None:
        self._next_fit = self._clock + self._fit_period
        if self._num_victims:
            early = self._num_early / self._num_victims  # 0.5: the plan holds
            scale = self._budget_scale * 2 ** ((0.5 - early) / 4)
            self._budget_scale = min(max(scale, 1 / 16), 16.0)
            self._num_early = self._num_victims = 0
        # A class whose counts only decayed since the last fit has that fit's hull scaled
        # by the decay (costs and hits alike: the same steps, in the same order), so
        # only classes that saw uses, evictions or a reset are fitted afresh.
        new_counts, new_censored, hulls = self._new_counts, self._new_censored, self._hulls
        changed = [c in self._reset or bool(new_censored[c])
                   or any(new_counts[c * _NUM_BUCKETS:(c + 1) * _NUM_BUCKETS])
                   for c in range(self._num_classes)]
        self._counts += np.array(new_counts, dtype=np.float64).reshape(self._counts.shape)
        self._new_counts = [0] * len(new_counts)
        self._censored = [c + new for c, new in zip(self._censored, new_censored)]
        self._new_censored = [0] * self._num_classes
        self._reset = set()
        self._num_refs += self._new_refs
        self._new_refs = 0
        for c, fresh in enumerate(changed):
            if fresh or hulls[c] is None:
                hulls[c] = _hull_steps(self._counts[c].tolist(), self._censored[c])
            else:
                hulls[c] = [(cost * _DECAY, hits * _DECAY, age) for cost, hits, age in hulls[c]]
        self._retention = spend_budget(hulls, self._budget_scale * self._capacity * self._num_refs)
        self._counts *= _DECAY
        self._censored = [c * _DECAY for c in self._censored]
        self._num_refs *= _DECAY
        self._heap_is_stale = True   # rebuilt under the new ages when a victim is asked for

    def _rebuild(self) -> None:
        """The heap from the leaf runs, under the ages just fitted: O(runs)."""
        retention = self._retention
        heap = [(used + retention[run.cls], used, run.id)
                for run in self._runs.runs.values() if not run.children
                for used in (run.tail_used,)]
        heapq.heapify(heap)
        self._heap = heap
        self._heap_is_stale = False
