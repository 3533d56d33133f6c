"""HostStore: the L2 tier -- a HostPool's slots named by a TierIndex.

The pool owns bytes and slot states, the index owns names, leases and the
eviction order. This class keeps the two in step: an indexed page always sits
in a READY slot, a leased page's slot is leased in the pool too, and a slot
leaves the index before it goes back to the free list.

What happens to an evicted page's bytes (spill to L3, or nothing) is the
caller's ``on_evict`` hook, run while the slots still hold the data. Who hears
of pages entering and leaving (the daemon's KV events) is ``observer``'s
business: it is told after the index changed (kvstore/index/observer.py).
"""

from __future__ import annotations

from collections import Counter
from itertools import compress
from operator import itemgetter, ne
from typing import Callable, Sequence

import numpy as np

from kvstore.host_pool import HostPool
from kvstore.index.observer import NULL_OBSERVER, TierObserver
from kvstore.index.tier_index import TierIndex, TierIndexError
from kvstore.page_keys import PageKey

EvictHook = Callable[[list[PageKey], list[int]], None]


def _drop_pages(keys: list[PageKey], slots: list[int]) -> None:
    """The default eviction hook: evicted pages are simply gone."""


class HostStore:
    def __init__(self, pool: HostPool, policy: str = "lru", on_evict: EvictHook = _drop_pages,
                 observer: TierObserver = NULL_OBSERVER) -> None:
        self.pool = pool
        self.index = TierIndex(pool.num_slots, policy)
        self.on_evict = on_evict
        self.observer = observer

    @property
    def capacity(self) -> int:
        return self.pool.num_slots

    def match_prefix(self, keys: Sequence[PageKey]) -> int:
        """Leading keys held in L2. Changes nothing."""
        return self.index.match_prefix(keys)

    def slots_of(self, keys: Sequence[PageKey]) -> list[int]:
        """Slots of present keys; raises KeyError for an absent one."""
        return self.index.slots_of(keys)

    def slot_array(self, keys: Sequence[PageKey]) -> np.ndarray:
        """``slots_of`` as an int64 array."""
        return self.index.slot_array(keys)

    def reserve(self, n: int) -> list[int] | None:
        """``n`` slots to write into, evicting unleased pages if needed; None if that
        can't free enough (every other page is leased). Evicted pages pass through
        ``on_evict`` before their slots are reused."""
        shortfall = n - self.pool.num_free
        if shortfall > 0:
            victims = self.index.evict(shortfall)
            if not victims:
                return None
            keys, slots = list(map(itemgetter(0), victims)), list(map(itemgetter(1), victims))
            self.observer.removed(keys)
            try:
                self.on_evict(keys, slots)
            finally:
                self.pool.free(slots)  # the pages left the index; their slots must come back
        return self.pool.try_reserve(n)

    def evict(self, n: int) -> int:
        """Evict up to ``n`` unleased pages chosen by the policy (``on_evict`` sees them,
        their slots go back to the pool); how many were evicted. For a budget shared with
        other stores (the daemon's pools), which frees memory here for use elsewhere."""
        done = 0
        while n > 0:
            victims = self.index.evict(n)
            if not victims:
                n //= 2   # fewer unleased pages than asked: take what there is
                continue
            keys, slots = list(map(itemgetter(0), victims)), list(map(itemgetter(1), victims))
            self.observer.removed(keys)
            try:
                self.on_evict(keys, slots)
            finally:
                self.pool.free(slots)
            done += len(victims)
            break
        return done

    def commit(
        self, keys: Sequence[PageKey], slots: Sequence[int], parents: Sequence[PageKey | None]
    ) -> None:
        """Publish written slots under ``keys``; ``parents[i]`` is the page before ``keys[i]``
        in its chain (None for a chain's first page)."""
        self.pool.mark_ready(slots)
        keys, slots = list(keys), list(slots)
        if not keys:
            return
        # Cut where a page does not follow the one before it; each piece is one chain.
        cuts = [0, *(i + 1 for i in compress(range(len(keys) - 1), map(ne, parents[1:], keys[:-1]))),
                len(keys)]
        for start, end in zip(cuts, cuts[1:]):
            self.index.insert_chain(keys[start:end], slots[start:end], parents[start])
            self.observer.stored(keys[start:end], parents[start])

    def discard(self, keys: Sequence[PageKey]) -> None:
        """Drop present, unleased pages without passing them to ``on_evict``.
        Raises (and changes nothing) if any is absent, leased or named twice."""
        if len(set(keys)) != len(keys):
            raise TierIndexError("discard() got a key twice")
        for key in keys:
            if key not in self.index or self.index.is_leased(key):
                raise TierIndexError(f"discard() of key {key.hex()} that is absent or leased")
        self.pool.free([self.index.remove(k) for k in keys])
        self.observer.removed(keys)

    def abort(self, slots: Sequence[int]) -> None:
        """Give back reserved slots whose write failed."""
        self.pool.free(slots)

    def touch(self, keys: Sequence[PageKey]) -> None:
        self.index.touch(keys)

    def lease(self, keys: Sequence[PageKey]) -> list[int]:
        """Protect pages from eviction and slot reuse; returns their slots."""
        slots = self.index.lease_slots(keys)   # an array all the way into the pool
        self.pool.lease(slots)
        return slots.tolist()

    def lease_prefix(self, keys: Sequence[PageKey]) -> int:
        """Lease the longest prefix of a chain held in L2 (one walk); its length."""
        num_hit, slots = self.index.lease_prefix(keys)
        if num_hit:
            self.pool.lease(slots)
        return num_hit

    def release(self, keys: Sequence[PageKey]) -> None:
        """End one lease on each key. Raises (and changes nothing) if a key holds fewer
        leases than it is named here."""
        self.pool.unlease(self.index.release_slots(keys))

    def check_integrity(self, quiescent: bool = False, held: Counter | None = None) -> None:
        """Raise if the pool, the index and the leases disagree. ``quiescent``: also
        require that no slot is mid-write and no lease is held (between requests) but
        the ones ``held`` counts (leases its owner keeps between requests on purpose)."""
        self.pool.check_integrity()
        self.index.check_integrity()
        slots = [slot for _, slot in self.index.items()]
        if len(set(slots)) != len(slots):
            raise TierIndexError("two keys share a slot")
        for key, slot in self.index.items():
            if self.pool.state(slot) != "ready":
                raise TierIndexError(f"indexed slot {slot} is {self.pool.state(slot)}, not ready")
            leased = self.index.lease_count(key)
            if self.pool.lease_count(slot) != leased:
                raise TierIndexError(
                    f"slot {slot} has {self.pool.lease_count(slot)} pool leases, index says {leased}"
                )
        num_ready = self.pool.num_slots - self.pool.num_free - self.pool.num_reserved
        if num_ready != len(slots):
            raise TierIndexError(f"{num_ready} ready slots but {len(slots)} indexed pages: a slot leaked")
        held = held or Counter()
        if quiescent and (self.pool.num_reserved or any(
                self.index.lease_count(k) != held[k] for k, _ in self.index.items())):
            raise TierIndexError("slots are reserved or leased while the store should be idle")
