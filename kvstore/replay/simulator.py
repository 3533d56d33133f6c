"""Trace replay through the service's own TierIndex and eviction policies.

Single tier (the definition shared with other hit-rate studies)::

    for each request, in trace order:
        hits += number of leading pages present     # prefix rule: after the first
                                                    # miss nothing counts
        for each page, in order:
            present -> touch it
            absent  -> evict one page if full, insert it (parent = previous page)
    hit_rate = hits / all page references

Two tiers (L2 host memory over L3 storage, write-back as the controller
does): the leading pages present in L2 or L3 are hits, counted per tier by
where each was found; every page not in L2 is inserted into L2 (an L3 hit is
loaded back, and the L3 copy stays); a page evicted from L2 is demoted into
L3 (touched there if L3 already holds it), and L3 evicts by its own policy.

Nothing here orders pages: every decision is the policy's, through the index.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from kvstore.eviction import EvictionPolicy, make_policy
from kvstore.page_keys import PageKey
from kvstore.replay.trace import Trace
from kvstore.index.tier_index import TierIndex

ProgressFn = Callable[[int], None]  # called with the number of references replayed so far


class ReplayError(RuntimeError):
    """The index refused an operation the replay needed (a policy broke its contract)."""


@dataclass(frozen=True)
class ReplayResult:
    """Hits of one policy at one capacity over one trace."""

    policy: str
    capacity: int
    num_refs: int
    num_hits: int
    seconds: float
    """CPU seconds of the replay (process time: on a shared machine wall time would
    also count the wait for a core; the replay is one thread)."""
    followed: tuple[tuple[int, str], ...] = ()
    """For a policy that follows others (``adaptive``): (reference, expert) at the
    start and at every switch; empty for the others."""

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_refs if self.num_refs else 0.0


@dataclass(frozen=True)
class TieredResult:
    """Hits per tier of one policy over an L2 -> L3 hierarchy."""

    policy: str
    l2_capacity: int
    l3_capacity: int
    num_refs: int
    num_l2_hits: int
    num_l3_hits: int
    num_demotions: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return (self.num_l2_hits + self.num_l3_hits) / self.num_refs if self.num_refs else 0.0

    @property
    def l2_hit_rate(self) -> float:
        return self.num_l2_hits / self.num_refs if self.num_refs else 0.0

    @property
    def l3_hit_rate(self) -> float:
        return self.num_l3_hits / self.num_refs if self.num_refs else 0.0


def ideal_hit_rate(trace: Trace) -> float:
    """Hit rate of an unbounded cache: the ceiling for any policy and capacity."""
    seen: set[PageKey] = set()
    hits = refs = 0
    for request in trace.requests:
        keys = request.keys
        refs += len(keys)
        for key in keys:
            if key not in seen:
                break
            hits += 1
        seen.update(keys)
    return hits / refs if refs else 0.0


def _as_policy(policy: EvictionPolicy | str) -> EvictionPolicy:
    return make_policy(policy) if isinstance(policy, str) else policy


def _make_room(index: TierIndex) -> list[tuple[PageKey, int]]:
    if index.num_free > 0:
        return []
    evicted = index.evict(1)
    if not evicted:
        raise ReplayError(
            f"policy {index.policy.name!r} named no victim in a full index of "
            f"{index.capacity} pages with no leases"
        )
    return evicted


def replay(
    trace: Trace,
    capacity: int,
    policy: EvictionPolicy | str,
    progress: ProgressFn | None = None,
) -> ReplayResult:
    """Replay ``trace`` through one TierIndex of ``capacity`` pages (module docstring)."""
    index = TierIndex(capacity, _as_policy(policy))
    touch, insert, match_prefix = index.touch, index.insert, index.match_prefix
    num_hits = num_refs = 0
    start = time.process_time()
    for request in trace.requests:
        keys = request.keys
        num_hit = match_prefix(keys)
        num_hits += num_hit
        touch(keys[:num_hit])
        parent = keys[num_hit - 1] if num_hit else None
        for key in keys[num_hit:]:
            if key in index:  # cached but past the first miss: stranded by its prefix
                touch((key,))
            else:
                _make_room(index)
                insert(key, num_refs, parent)
            parent = key
        num_refs += len(keys)
        if progress is not None:
            progress(num_refs)
    seconds = time.process_time() - start
    followed = getattr(index.policy, "followed", None)  # the adaptive policy's record
    return ReplayResult(index.policy.name, capacity, num_refs, num_hits, seconds,
                        tuple(followed()) if followed is not None else ())


class _TieredCache:
    """L2 and L3 indexes with write-back demotion; the replay's view of the controller."""

    def __init__(self, l2: TierIndex, l3: TierIndex) -> None:
        self.l2, self.l3 = l2, l3
        self.parent_of: dict[PageKey, PageKey | None] = {}
        self.num_demotions = 0

    def store_l2(self, key: PageKey, slot: int) -> None:
        for victim, victim_slot in _make_room(self.l2):
            self.demote(victim, victim_slot)
        self.l2.insert(key, slot, self.parent_of.get(key))

    def demote(self, key: PageKey, slot: int) -> None:
        self.num_demotions += 1
        if key in self.l3:
            self.l3.touch((key,))
            return
        _make_room(self.l3)
        self.l3.insert(key, slot, self.parent_of.get(key))


def replay_tiered(
    trace: Trace,
    l2_capacity: int,
    l3_capacity: int,
    policy: str,
    progress: ProgressFn | None = None,
) -> TieredResult:
    """Replay ``trace`` through L2 over L3, each a TierIndex with its own ``policy`` instance."""
    cache = _TieredCache(TierIndex(l2_capacity, policy), TierIndex(l3_capacity, policy))
    l2, l3, parent_of = cache.l2, cache.l3, cache.parent_of
    num_l2 = num_l3 = num_refs = 0
    start = time.process_time()
    for request in trace.requests:
        in_prefix, parent = True, None
        for key in request.keys:
            parent_of.setdefault(key, parent)
            parent = key
            if key in l2:
                num_l2 += in_prefix
                l2.touch((key,))
                continue
            if key in l3 and in_prefix:
                num_l3 += 1
                l3.touch((key,))
            else:
                in_prefix = False
            cache.store_l2(key, num_refs)
        num_refs += len(request.keys)
        if progress is not None:
            progress(num_refs)
    return TieredResult(
        l2.policy.name, l2_capacity, l3_capacity, num_refs, num_l2, num_l3,
        cache.num_demotions, time.process_time() - start,
    )


class ProgressBar:
    """A one-line progress bar on a stream (stderr), redrawn at most every 1/10 s.

    Disabled (draws nothing) when ``enabled`` is false; use as a context manager
    so the line is finished even when the replay raises.
    """

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr,
                 enabled: bool = True, width: int = 30) -> None:
        self.total, self.label, self.stream = max(total, 1), label, stream
        self.enabled, self.width = enabled, width
        self._last_draw = 0.0
        self._start = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last_draw < 0.1 and done < self.total):
            return
        self._last_draw = now
        frac = min(done / self.total, 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {frac:6.1%} {done:,}/{self.total:,} refs "
            f"{now - self._start:5.1f}s"
        )
        self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")  # clear the line; results print after
            self.stream.flush()
