"""Adaptive eviction: follow whichever expert policy wins on a miniature of the live workload.

No single policy wins everywhere (bench/hitrate.py): the learned prefix-lhd
leads where the tier is small against a chat workload's reuse set, LRU or
ARC where recency is all there is. This policy runs the candidates
("experts") side by side at a fraction of the cost and lets the tier follow
the current leader::

    every reference (insert = live miss, access = live hit)
      ├── the live expert: one full-size instance, names the victims
      └── if hash(key) < rate: the key is "sampled" (SHARDS, Waldspurger et al.,
          FAST'15 / ATC'17): every expert's miniature (capacity x rate pages,
          sampled keys only) replays the reference and counts a hit or a miss
    every capacity/2 references (an "epoch"): hit counts decay, and the
      leader changes when a challenger's decayed hits beat it clearly
      (:func:`pick_leader`); the new expert's full-size instance is built
      from the cached pages, most recently used last (O(capacity) per
      switch, at most one switch per epoch: O(log n) amortised per reference)

Spatial sampling keeps each miniature a scaled model of the whole tier: a
sampled key is seen on every one of its references, so reuse distances in
the miniature are those of the tier divided by the rate. The miniatures see
pages without their chains (a sampled page's parent is almost never
sampled): they measure how well each expert *orders* pages.

Two rules hold whatever is followed:

- **Prefix rule**: only leaves (pages without a cached child) are victims.
  The prefix experts (prefix-lhd, prefix-slru) choose leaves by themselves
  and run bare; the others (LRU, S3-FIFO, ARC) run inside a
  :class:`_LeafGuard`, which keeps the chain links and parks a page in the
  expert while it has a cached child (out of its queues until its last child
  leaves), so they rank only leaves and a chain shrinks from its tail.
- **Leases**: ``is_evictable`` from the index is asked of every victim.

Cost: the live expert's own cost (plus the leaf guard's dict operations
when a flat expert is followed), one multiply-add for the sample test per
reference, and per sampled reference one step of each miniature. The
miniatures hold ``len(experts) x capacity x rate`` cached pages, 5/128 =
3.9% of the tier's at the default rate, plus ghost keys: their ghost lists
are at most 2x their size (prefix-lhd, prefix-slru) or 1x (S3-FIFO, ARC), so
everything together stays under 11/128 = 8.6% of the tier's entries.
Measured on the conversation trace (bench/hitrate.py): see the README.

What it does not do (yet): the miniatures see pages without their chains,
and there rank prefix-slru above prefix-lhd on the conversation trace, where
the full-size tiers rank them the other way, so that mis-ranking only
matters for larger tiers.

Small tiers (under 8,192 pages, where 1/128 miniatures would hold under 64
pages) run a guard instead: the followed expert against one challenger, LRU
while prefix-lhd is followed and prefix-lhd while LRU is. The followed expert
is scored by the live tier itself on the sampled keys (exact, no miniature
artefacts); only the challenger has a miniature, sampled at the rate where it
and its ghosts hold ``shadow_budget`` (9%) of the tier, at most 1/32 (more
costs time and gained nothing measured): 1/32 for LRU (no ghosts: 156
pages at 5,000), 3/100 for prefix-lhd. A lead of
``guard_min_gain`` (0.5% of hits) at z = 3, held for ``guard_patience`` (1)
epoch, switches; the new challenger is sampled afresh. So a small tier
follows LRU where LRU beats prefix-lhd, and the sampling costs one LRU step
per sampled reference.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from itertools import repeat
from typing import Callable, Sequence

import numpy as np

from kvstore.eviction import make_policy
from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey

# The first is followed until the miniatures have seen enough to disagree:
# the expert with the best record on our workloads.
DEFAULT_EXPERTS = ("prefix-lhd", "prefix-slru", "lru", "s3fifo", "arc")
# Miniatures keep ghost histories of at most twice their own size (the
# full-size prefix experts keep 4x): what bounds the shadow state (see
# AdaptivePolicy.num_shadow_keys). S3-FIFO's and ARC's are below that already.
_MINIATURE_OPTIONS: dict[str, dict[str, float]] = {
    "prefix-lhd": {"history_factor": 2.0},
    "prefix-slru": {"ghost_factor": 2.0},
}
# Keys each miniature remembers per cached page beyond the page itself (its
# ghosts, with the options above): what sizes a small tier's sampling rate.
# A policy not listed is charged two.
_GHOSTS_PER_PAGE = {"prefix-lhd": 2.0, "prefix-slru": 2.0, "s3fifo": 1.0, "arc": 1.0, "lru": 0.0,
                    "lfu": 0.0}
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd multiplier of Fibonacci hashing
# Added before the shift (multiply-add-shift): without it key 0, the first block
# id of a trace and often the shared root of every chain, hashes to 0 and is
# always sampled, so every miniature spends most of its references on it.
_OFFSET = 0x5851F42D4C957F2D


def _always(key: PageKey) -> bool:
    return True


def key_hash(key: PageKey) -> int:
    """A 32-bit hash of a page key, uniform also for keys that are small integers.

    Service keys are digests already; trace keys (Mooncake block ids) are
    little-endian counters, whose low bytes alone would sample a range of ids.
    """
    return ((int.from_bytes(key[:8], "little") * _GOLDEN + _OFFSET) & _MASK64) >> 32


def _sampled(keys: Sequence[PageKey], start: int, end: int, threshold: int) -> list[int]:
    """Positions in [start, end) of the keys with ``key_hash(key) < threshold``,
    hashed as one array when the keys are of one length of at least 8 bytes."""
    chunk = keys[start:end]
    size = len(chunk[0]) if chunk else 0
    # As arrays for 16 keys or more (below, their fixed cost is more than hashing one by
    # one) of one length (a tier's keys are one digest size; trace keys one counter
    # width). The total is the check: checking each key's length costs more than the
    # hashing, and keys of mixed lengths that add up exactly only sample other keys.
    joined = b"".join(chunk) if len(chunk) >= 16 else b""
    if size < 8 or len(joined) != size * len(chunk):
        return [start + j for j, key in enumerate(chunk) if key_hash(key) < threshold]
    if size % 8 == 0:  # each key's first 8 bytes, as a strided view: int.from_bytes(key[:8], "little")
        low = np.frombuffer(joined, dtype="<u8")[::size // 8]
    else:
        rows = np.frombuffer(joined, dtype=np.uint8).reshape(len(chunk), size)
        low = np.ascontiguousarray(rows[:, :8]).view("<u8").ravel()
    hashes = (low * np.uint64(_GOLDEN) + np.uint64(_OFFSET)) >> np.uint64(32)  # wraps mod 2**64
    return (np.flatnonzero(hashes < threshold) + start).tolist()


def pick_leader(scores: Sequence[float], ahead: Sequence[Sequence[float]], leader: int,
                min_gain: float, z: float) -> int:
    """The expert to follow next, from the miniatures' decayed hit counts.

    ``scores[i]``: hits of expert i; ``ahead[i][j]``: sampled references that
    i hit and j missed. The best-scoring expert replaces ``leader`` only when
    its lead over the leader, ``ahead[best][leader] - ahead[leader][best]``,
    is more than ``min_gain`` of the leader's hits *and* more than ``z``
    standard deviations (McNemar: references where both hit or both missed
    say nothing; the discordant ones are a sign test, variance ~ their sum).
    So small or noisy leads (small tiers, few sampled hits) never switch.
    Ties keep the leader.
    """
    best = max(range(len(scores)), key=lambda i: (scores[i], i == leader))
    if best == leader:
        return leader
    won, lost = ahead[best][leader], ahead[leader][best]
    gap = won - lost
    if gap <= min_gain * scores[leader] or gap * gap <= z * z * (won + lost):
        return leader
    return best


class _Miniature:
    """One expert replaying the sampled references in a tier of ``capacity`` pages."""

    __slots__ = ("policy", "capacity", "keys", "score")

    def __init__(self, name: str, capacity: int) -> None:
        self.policy = make_policy(name, **_MINIATURE_OPTIONS.get(name, {}))
        self.policy.set_capacity(capacity)
        self.capacity = capacity
        self.keys: set[PageKey] = set()
        self.score = 0.0  # decayed hits

    def reference(self, key: PageKey) -> bool:
        """Replay one reference; whether it hit."""
        policy = self.policy
        if key in self.keys:
            self.score += 1.0
            policy.on_access(key)
            return True
        if len(self.keys) >= self.capacity:
            for victim in policy.choose_victims(1, _always):
                self.keys.discard(victim)
                policy.on_remove(victim)
        self.keys.add(key)
        policy.on_insert(key, None)
        return False


class _LeafGuard(EvictionPolicy):
    """A flat expert (LRU, S3-FIFO, ARC) held to the prefix rule, as the live expert.

    Keeps the chain links the index reports and each page's last use. A page
    with a cached child is *parked* in the expert (out of its queues until
    its last child leaves, then back where it is looked at next), so the
    expert only ever ranks leaves and a chain shrinks from its tail; an expert
    that cannot park is shown parents as not evictable instead (it steps past
    them). The prefix experts need none of this: they choose leaves by
    themselves.
    """

    def __init__(self, policy: EvictionPolicy) -> None:
        self.policy, self.name = policy, policy.name
        self._park = getattr(policy, "park", None)
        self._unpark = getattr(policy, "unpark", None)
        self._clock = 0
        self._last: dict[PageKey, int] = {}  # cached key -> clock of its last use
        self._parent: dict[PageKey, PageKey] = {}
        self._num_children: dict[PageKey, int] = {}  # only keys with cached children
        self._leaves: set[PageKey] = set()  # the others

    def set_capacity(self, capacity: int) -> None:
        self.policy.set_capacity(capacity)

    def _add_child(self, parent: PageKey) -> None:
        count = self._num_children.get(parent, 0)
        self._num_children[parent] = count + 1
        if not count:
            self._leaves.discard(parent)
            if self._park is not None:
                self._park(parent)

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._clock += 1
        self._last[key] = self._clock
        self._leaves.add(key)
        self.policy.on_insert(key, parent)
        if parent is not None:  # the index names only a cached parent
            self._parent[key] = parent
            self._add_child(parent)

    def on_link(self, child: PageKey, parent: PageKey) -> None:
        self._parent[child] = parent
        self._add_child(parent)

    def on_access(self, key: PageKey) -> None:
        self._clock += 1
        self._last[key] = self._clock
        self.policy.on_access(key)

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        start = self._clock
        self._clock += len(keys)
        self._last.update(zip(keys, range(start + 1, self._clock + 1)))
        self.policy.on_access_run(keys)

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        if len(set(keys)) != len(keys):
            return super().on_insert_run(keys, parent)
        start = self._clock
        self._clock += len(keys)
        self._last.update(zip(keys, range(start + 1, self._clock + 1)))
        self.policy.on_insert_run(keys, parent)
        self._leaves.add(keys[-1])
        num_children = self._num_children
        if parent is not None:
            self._parent[keys[0]] = parent
            self._add_child(parent)
        self._parent.update(zip(keys[1:], keys))
        num_children.update(zip(keys[:-1], repeat(1)))  # new pages: one child each, the next
        if self._park is not None:
            deque(map(self._park, keys[:-1]), maxlen=0)

    def on_remove(self, key: PageKey) -> None:
        del self._last[key]
        # Children of a removed page become roots; the index re-links them
        # (on_link) if the page comes back, so its count starts afresh.
        num_children = self._num_children
        num_children.pop(key, None)
        self._leaves.discard(key)
        self.policy.on_remove(key)
        parent = self._parent.pop(key, None)
        if parent is not None and parent in num_children:
            left = num_children[parent] - 1
            if left:
                num_children[parent] = left
            else:
                del num_children[parent]
                self._leaves.add(parent)
                if self._unpark is not None:
                    self._unpark(parent)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        num_children = self._num_children
        victims = self.policy.choose_victims(
            n, lambda k: k not in num_children and is_evictable(k))
        if victims or n == 1:
            return victims
        # Fewer than n leaves now, but evicting some makes their parents leaves:
        # peel the chains by recency (rare: the index asks one at a time when it can).
        return self._peel(n, is_evictable)

    def __len__(self) -> int:
        return len(self._last)

    def pages_by_recency(self) -> list[tuple[PageKey, PageKey | None]]:
        """(page, cached parent or None), least recently used first. Changes nothing."""
        last, parent_of = self._last, self._parent
        return [(key, parent_of.get(key)) for key in sorted(last, key=last.__getitem__)]

    def _peel(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        """``n`` victims, least recently used leaf first, counting leaves freed on the way."""
        last, parent_of, num_children = self._last, self._parent, self._num_children
        heap = [(last[k], k) for k in self._leaves if is_evictable(k)]
        heapq.heapify(heap)
        children_left: dict[PageKey, int] = {}
        victims: list[PageKey] = []
        while heap and len(victims) < n:
            _, key = heapq.heappop(heap)
            victims.append(key)
            parent = parent_of.get(key)
            if parent is None or parent not in num_children:
                continue
            left = children_left[parent] = children_left.get(parent, num_children[parent]) - 1
            if left == 0 and is_evictable(parent):
                heapq.heappush(heap, (last[parent], parent))
        return victims if len(victims) == n else []


class AdaptivePolicy(EvictionPolicy):
    """Follows the expert whose miniature scores best (see the module docstring)."""

    name = "adaptive"

    def __init__(self, experts: Sequence[str] = DEFAULT_EXPERTS, sample_rate: float = 1 / 128,
                 min_gain: float = 0.02, z: float = 3.0, half_life: float | None = None,
                 min_sample_pages: int = 64, patience: int = 4, guard: str | None = "lru",
                 shadow_budget: float = 0.09, guard_min_gain: float = 0.005,
                 min_guard_pages: int = 16, guard_patience: int = 1) -> None:
        if not experts or len(set(experts)) != len(experts) or "adaptive" in experts:
            raise ValueError(f"experts must be distinct registered policies, got {experts!r}")
        if not 0.0 < sample_rate <= 1.0 or min_gain < 0 or z < 0 or (half_life or 1) <= 0:
            raise ValueError("sample_rate must be in (0, 1]; min_gain and z >= 0; half_life > 0")
        if guard is not None and guard not in experts:
            raise ValueError(f"guard {guard!r} must be one of the experts {experts!r}")
        if not 0.0 < shadow_budget <= 1.0 or guard_min_gain < 0:
            raise ValueError("shadow_budget must be in (0, 1]; guard_min_gain >= 0")
        # Small tiers (miniatures under min_sample_pages at sample_rate): the
        # first expert and the guard only, sampled at the rate that fills
        # shadow_budget of the tier, the first scored by the live tier itself.
        self._guard = None if guard is None or guard == experts[0] else experts.index(guard)
        self._shadow_budget, self._guard_min_gain = shadow_budget, guard_min_gain
        self._min_guard_pages = max(min_guard_pages, 1)
        self._guard_patience = max(guard_patience, 1)  # epochs a challenger must win (small tiers)
        self._half_life = half_life  # references; None: chosen by capacity (set_capacity)
        self._min_sample_pages = min_sample_pages
        # A challenger must win this many epochs in a row (two tier lifetimes
        # at the default): a lead in one phase of the trace does not move the tier.
        self._patience = max(patience, 1)
        self._challenger, self._num_wins = 0, 0
        self._experts = tuple(experts)
        self._rate, self._min_gain, self._z = sample_rate, min_gain, z
        self._clock = 0  # references seen
        self._leader = 0
        self._followed: list[tuple[int, str]] = [(0, self._experts[0])]
        self.set_capacity(4096)  # until the index says

    def set_capacity(self, capacity: int) -> None:
        self._capacity = capacity
        self._bind(self._new_live(self._leader))
        # A miniature of a few pages ranks experts by noise and by its own
        # artefacts (a 15-page S3-FIFO is not a scaled 1,000-page one), so a
        # tier whose miniatures would be smaller than min_sample_pages keeps
        # its first expert and samples nothing.
        self._small = (round(capacity * self._rate) < max(self._min_sample_pages, 1)
                       and self._guard is not None)
        self._setup_sampling()

    def _setup_sampling(self) -> None:
        """Miniatures, sampling rate and epochs for the capacity and (small tiers) the leader."""
        capacity, rate = self._capacity, self._rate
        active = tuple(range(len(self._experts)))
        mini_capacity = round(capacity * rate)
        can_switch = mini_capacity >= max(self._min_sample_pages, 1)
        self._live_scored, self._gain = False, self._min_gain
        if self._small:
            # Too small for every expert's miniature: the followed expert
            # against one challenger, the guard (LRU) while the first expert
            # is followed and the first expert while the guard is. The
            # followed expert is scored by the live tier itself (a miniature
            # of a few dozen pages models LRU well, SHARDS, but a learned
            # policy badly), so only the challenger has a miniature, sampled
            # at the rate where it and its ghosts fill shadow_budget of the
            # tier; a smaller lead than min_gain moves the tier (guard_min_gain):
            # the guard is there so that the tier is never much below LRU.
            challenger = self._guard if self._leader == 0 else 0
            active = (challenger,)
            ghosts = _GHOSTS_PER_PAGE.get(self._experts[challenger], 2.0)
            rate = min(1 / 32, self._shadow_budget / (1.0 + ghosts))
            mini_capacity = int(capacity * rate)
            can_switch = self._live_scored = mini_capacity >= self._min_guard_pages
            self._gain = self._guard_min_gain
        self._active = active if can_switch else tuple(range(len(self._experts)))
        self._threshold = math.ceil(rate * 2**32) if can_switch else 0  # sampled: hash < this
        self._minis = [_Miniature(self._experts[i], max(mini_capacity, 1)) for i in self._active]
        # Discordance counts between the miniatures and, last, the live tier.
        size = len(self._active) + 1
        self._ahead = [[0.0] * size for _ in range(size)]
        self._live_score = 0.0  # the live tier's decayed hits on sampled keys
        # Scores are judged every epoch; they decay with a half-life of four
        # tier lifetimes, but never shorter than ~1,000 sampled references
        # (~250 when the live tier scores the leader), so a small tier (few
        # sampled hits) is judged on enough evidence.
        half_life = self._half_life or max(4 * capacity, (256 if self._live_scored else 1024) / rate)
        self._epoch = max(min(capacity // 2, int(half_life) // 4), 16)
        self._next_epoch = self._clock + self._epoch
        self._decay = 0.5 ** (self._epoch / half_life)
        # The miniatures fill and learn first; a tier that cannot switch never does.
        self._warmup = self._clock + half_life if can_switch else math.inf
        self._challenger, self._num_wins = 0, 0

    # ---- what the bench and tests read ---------------------------------------
    @property
    def leader(self) -> str:
        """The expert followed now. Changes nothing."""
        return self._experts[self._leader]

    def followed(self) -> list[tuple[int, str]]:
        """(reference number, expert) at the start and at every switch since. Changes nothing."""
        return list(self._followed)

    def scores(self) -> dict[str, float]:
        """Each sampled expert's decayed hit count on the sampled keys (the followed
        one's from the live tier on a small tier: see set_capacity). Changes nothing."""
        scores = {self._experts[i]: mini.score for i, mini in zip(self._active, self._minis)}
        if self._live_scored:
            scores[self.leader] = self._live_score
        return scores

    def num_shadow_keys(self) -> tuple[int, int]:
        """(pages cached, keys remembered incl. ghosts) by all miniatures together."""
        cached = sum(len(m.keys) for m in self._minis)
        ghosts = sum(len(getattr(m.policy, attr, ())) for m in self._minis
                     for attr in ("_ghost", "_b1", "_b2"))
        return cached, cached + ghosts

    # ---- EvictionPolicy ------------------------------------------------------
    # The hot path: a reference is counted, sampled (a multiply and a compare,
    # nothing when the tier is too small to sample) and handed to the live
    # expert. on_link, on_remove and choose_victims are the live expert's own
    # bound methods (set in _bind): no frame of ours in between.
    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        clock = self._clock = self._clock + 1
        if self._threshold and ((int.from_bytes(key[:8], "little") * _GOLDEN + _OFFSET) & _MASK64) \
                >> 32 < self._threshold:  # key_hash(key), inline
            self._sample(key, False)
        if clock >= self._next_epoch:
            self._end_epoch()
        self._live.on_insert(key, parent)

    def on_access(self, key: PageKey) -> None:
        clock = self._clock = self._clock + 1
        if self._threshold and ((int.from_bytes(key[:8], "little") * _GOLDEN + _OFFSET) & _MASK64) \
                >> 32 < self._threshold:  # key_hash(key), inline
            self._sample(key, True)
        if clock >= self._next_epoch:
            self._end_epoch()
        self._live.on_access(key)

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        """``on_access`` of each key in order, with the same effect (see _feed)."""
        self._feed(keys, True, None)

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        """``on_insert`` of each key in order, each under the one before (see _feed)."""
        self._feed(keys, False, parent)

    def _feed(self, keys: Sequence[PageKey], hit: bool, parent: PageKey | None) -> None:
        """References in order, as per-key calls would make them. The live expert gets
        the keys in one call, cut only where an epoch's end hands the tier to another
        expert (the key that ends the epoch goes to the new one, as per key)."""
        given = 0  # keys[:given] went to the live expert

        def give(upto: int) -> None:
            nonlocal given
            if upto > given:
                if hit:
                    self._live.on_access_run(keys[given:upto])
                else:
                    self._live.on_insert_run(keys[given:upto], keys[given - 1] if given else parent)
            given = upto

        i, n = 0, len(keys)
        while i < n:
            # keys[i + j] is reference clock + 1 + j; the one reaching _next_epoch ends it
            end = min(n, i + max(self._next_epoch - self._clock, 1))
            if self._threshold:
                for j in _sampled(keys, i, end, self._threshold):
                    self._sample(keys[j], hit)
            self._clock += end - i
            if self._clock >= self._next_epoch:
                self._end_epoch(before_switch=lambda: give(end - 1))
            i = end
        give(n)

    def on_remove(self, key: PageKey) -> None:  # replaced per instance by _bind
        self._live.on_remove(key)

    def on_remove_many(self, keys: Sequence[PageKey]) -> None:  # replaced per instance by _bind
        self._live.on_remove_many(keys)

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        return self._live.choose_victims(n, is_evictable)  # replaced per instance by _bind

    def __len__(self) -> int:
        return len(self._live)

    def check(self) -> str | None:
        """What is inconsistent in the followed expert's structure, or None (for tests)."""
        check = getattr(self._live, "check", None)
        return check() if check is not None else None

    def _bind(self, live: EvictionPolicy) -> None:
        self._live = live
        self.on_link, self.on_remove = live.on_link, live.on_remove  # type: ignore[method-assign]
        self.on_remove_many = live.on_remove_many  # type: ignore[method-assign]
        self.choose_victims = live.choose_victims  # type: ignore[method-assign]

    # ---- sampling and switching ----------------------------------------------
    def _sample(self, key: PageKey, live_hit: bool) -> None:
        hits = [mini.reference(key) for mini in self._minis]
        if self._live_scored:
            hits.append(live_hit)
            if live_hit:
                self._live_score += 1.0
        if any(hits) and not all(hits):
            self._count_disagreement(hits)

    def _count_disagreement(self, hits: list[bool]) -> None:
        for i, hit in enumerate(hits):
            if hit:
                row = self._ahead[i]
                for j, other in enumerate(hits):
                    if not other:
                        row[j] += 1.0

    def _end_epoch(self, before_switch: Callable[[], None] | None = None) -> None:
        """Judge the epoch: decay the scores and maybe follow another expert (after
        ``before_switch``, which gives the expert followed until now what is its)."""
        self._next_epoch = self._clock + self._epoch
        if self._clock >= self._warmup:
            scores = [m.score for m in self._minis]
            if self._live_scored:  # the live tier, last, scores the leader
                scores.append(self._live_score)
                at = pick_leader(scores, self._ahead, len(self._minis), self._gain, self._z)
                pick = self._leader if at == len(self._minis) else self._active[at]
            else:
                pick = self._active[pick_leader(scores, self._ahead, self._active.index(self._leader),
                                                self._gain, self._z)]
            same = pick != self._leader and pick == self._challenger
            self._challenger, self._num_wins = pick, self._num_wins + 1 if same else 1
            patience = self._guard_patience if self._live_scored else self._patience
            if pick != self._leader and self._num_wins >= patience:
                if before_switch is not None:
                    before_switch()
                self._follow(pick)
        decay = self._decay
        for mini in self._minis:
            mini.score *= decay
        self._live_score *= decay
        for row in self._ahead:
            row[:] = [x * decay for x in row]

    def _new_live(self, expert: int) -> EvictionPolicy:
        live = make_policy(self._experts[expert])
        if not hasattr(live, "pages_by_recency"):  # a flat expert: held to the prefix rule
            live = _LeafGuard(live)
        live.set_capacity(self._capacity)
        return live

    def _follow(self, expert: int) -> None:
        """Hand the tier to another expert: a fresh instance, given the cached pages.

        Pages go in by last use, least recent first (each after its cached
        ancestors, so every chain link is an insert under a cached parent);
        the new expert starts as an LRU-ordered tier and learns from there.
        """
        pages = self._live.pages_by_recency()
        self._leader = expert
        self._followed.append((self._clock, self._experts[expert]))
        live = self._new_live(expert)
        self._bind(live)
        if self._small:  # a new challenger, sampled afresh
            self._setup_sampling()
        parent_of = dict(pages)
        planted: set[PageKey] = set()
        for key, _ in pages:
            chain = []
            while key is not None and key not in planted:
                chain.append(key)
                key = parent_of.get(key)
            for page in reversed(chain):
                parent = parent_of.get(page)
                live.on_insert(page, parent if parent in planted else None)
                planted.add(page)
