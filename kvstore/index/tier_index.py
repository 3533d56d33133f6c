"""TierIndex: which pages one tier holds, where, who is reading them, and what goes next.

The index maps a page key to a slot number (a host-pool slot for L2; any int
for a simulated tier) and keeps lease counts. Capacity is a hard limit: an
insert into a full index raises, so callers evict first (``evict(n)`` frees
exactly ``n`` or nothing). Which pages go is the policy's choice; leased pages
are never offered to it as evictable.

Where the work goes: names and places live in a :class:`RunTree` (runs of
chained pages as radix nodes, per-page state in flat arrays), so a lookup's
Python work follows the runs on its path. Leases are a per-entry ``int32``
array changed by one vectorised add per call: a lease that ends inside a run
protects exactly its pages, with no node split and no per-page object. A hit
reaches the policy as one ``on_access_run`` call (policies batch it).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kvstore.eviction import EvictionPolicy, make_policy
from kvstore.index.runs import RunTree
from kvstore.page_keys import PageKey


# ufunc.at takes its fast path only when the operand's dtype is the array's (numpy 2):
# with a Python int it is ~200x slower per element.
_ONE = np.int32(1)
_NO_SLOTS = np.zeros(0, dtype=np.int64)


class _Unleased:
    """``is_evictable`` for the policy: a page without a lease. ``count_leading`` checks
    a run of pages at once (a policy that trims a run from its tail asks it)."""

    __slots__ = ("_entry_of", "_leases")

    def __init__(self, entry_of: dict, leases: np.ndarray) -> None:
        self._entry_of, self._leases = entry_of, leases

    def __call__(self, key: PageKey) -> bool:
        return not self._leases[self._entry_of[key]]

    def count_leading(self, keys: Sequence[PageKey]) -> int:
        """How many of ``keys``, from the first, hold no lease."""
        entries = np.fromiter(map(self._entry_of.__getitem__, keys), dtype=np.int64, count=len(keys))
        leased = np.flatnonzero(self._leases[entries])
        return int(leased[0]) if len(leased) else len(keys)


class TierIndexError(RuntimeError):
    """An index operation broke its rules (duplicate insert, full index, leased removal)."""


class TierIndex:
    """Key -> slot map of one tier with leases, prefix matching and policy-driven eviction."""

    __slots__ = ("capacity", "policy", "_tree", "_leases")

    def __init__(self, capacity: int, policy: EvictionPolicy | str = "lru") -> None:
        if capacity <= 0:
            raise ValueError(f"TierIndex capacity must be > 0 pages, got {capacity}")
        self.capacity = capacity
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.policy.set_capacity(capacity)
        self._tree = RunTree(capacity)
        self._leases = np.zeros(capacity, dtype=np.int32)  # per entry; 0 for free entries

    # ---- queries (change nothing) -------------------------------------------
    def __len__(self) -> int:
        return len(self._tree)

    def __contains__(self, key: PageKey) -> bool:
        return key in self._tree.entry_of

    @property
    def num_free(self) -> int:
        return self.capacity - len(self._tree)

    @property
    def num_runs(self) -> int:
        """Radix nodes (runs of chained pages) the index holds now."""
        return self._tree.num_runs

    def contains_many(self, keys: Iterable[PageKey]) -> list[bool]:
        """Whether this tier holds each key (one C-level pass)."""
        return list(map(self._tree.entry_of.__contains__, keys))

    def get(self, key: PageKey) -> int | None:
        """The slot of ``key``, or None if this tier does not hold it."""
        e = self._tree.entry_of.get(key)
        return None if e is None else int(self._tree.slot[e])

    def get_many(self, keys: Iterable[PageKey]) -> list[int | None]:
        """The slot of each key (None where absent)."""
        entries = list(map(self._tree.entry_of.get, keys))
        if None not in entries:
            return self._tree.slot[entries].tolist()
        slot = self._tree.slot
        return [None if e is None else int(slot[e]) for e in entries]

    def match_prefix(self, keys: Sequence[PageKey]) -> int:
        """How many leading keys of a chain this tier holds. Changes nothing."""
        return self._tree.match_prefix(keys)

    def slots_of(self, keys: Iterable[PageKey]) -> list[int]:
        """Slots of present keys; raises KeyError for an absent one."""
        return self.slot_array(keys).tolist()

    def slot_array(self, keys: Iterable[PageKey]) -> np.ndarray:
        """``slots_of`` as an int64 array (packed for the wire without a list)."""
        return self._tree.slot[self._entries(keys, KeyError)]

    def is_leased(self, key: PageKey) -> bool:
        return self.lease_count(key) > 0

    def lease_count(self, key: PageKey) -> int:
        e = self._tree.entry_of.get(key)
        return 0 if e is None else int(self._leases[e])

    def items(self) -> Iterable[tuple[PageKey, int]]:
        """(key, slot) pairs; do not change the index while iterating."""
        entry_of = self._tree.entry_of
        return zip(entry_of, self._tree.slot[list(entry_of.values())].tolist())

    def _entries(self, keys: Iterable[PageKey], error: type[Exception] = TierIndexError) -> np.ndarray:
        keys = keys if isinstance(keys, list) else list(keys)
        entries = self._tree.entries_of(keys)
        if entries is None:
            missing = [k.hex() for k in keys if k not in self._tree.entry_of]
            raise error(f"keys not in the index: {missing[:4]}")
        return entries

    # ---- changes ------------------------------------------------------------
    def touch(self, keys: Iterable[PageKey]) -> None:
        """Record a hit on each key (it must be present), in order, as one run."""
        keys = keys if isinstance(keys, list) else list(keys)
        if keys:
            self.policy.on_access_run(keys)

    def insert(self, key: PageKey, slot: int, parent: PageKey | None = None) -> None:
        """Add ``key`` at ``slot``. Raises if it is present or the index is full."""
        tree = self._tree
        if key in tree.entry_of:
            raise TierIndexError(f"key {key.hex()} is already in the index; touch() it instead")
        if len(tree) >= self.capacity:
            raise TierIndexError(f"index is full ({self.capacity} pages): evict() before insert()")
        cached_parent = parent if parent is not None and parent in tree.entry_of else None
        _, children = tree.add(key, slot, parent)
        self.policy.on_insert(key, cached_parent)
        for child in children:
            self.policy.on_link(child, key)

    def insert_chain(self, keys: Sequence[PageKey], slots: Sequence[int],
                     parent: PageKey | None = None) -> None:
        """``insert`` each key in order, ``keys[i]`` following ``keys[i-1]`` (the first
        follows ``parent``): one store's new pages. Raises (and changes nothing) if a key
        is present or named twice, or the pages do not fit."""
        keys, tree = list(keys), self._tree
        if not keys:
            return
        if len(slots) != len(keys) or len(set(keys)) != len(keys) or not tree.entry_of.keys().isdisjoint(keys):
            raise TierIndexError("insert_chain() needs one slot per key and keys new to the index")
        if len(tree) + len(keys) > self.capacity:
            raise TierIndexError(f"index is full ({self.capacity} pages): evict() before insert()")
        cached_parent = parent if parent is not None and parent in tree.entry_of else None
        adopted = tree.add_chain(keys, slots, parent)
        policy = self.policy
        if not adopted:
            policy.on_insert_run(keys, cached_parent)
            return
        children_of = dict(adopted)
        for i, key in enumerate(keys):  # the order insert() keeps: each page, then its links
            policy.on_insert(key, keys[i - 1] if i else cached_parent)
            for child in children_of.get(i, ()):
                policy.on_link(child, key)

    def remove(self, key: PageKey) -> int:
        """Drop ``key`` and return its slot. Raises if it is absent or leased."""
        e = self._tree.entry_of[key]
        if self._leases[e]:
            raise TierIndexError(f"key {key.hex()} is leased; release it before removing")
        slot = int(self._tree.slot[e])
        self._tree.remove(key)
        self.policy.on_remove(key)
        return slot

    def evict(self, n: int) -> list[tuple[PageKey, int]]:
        """Remove exactly ``n`` unleased pages chosen by the policy, or none.

        Returns the (key, slot) pairs removed; the caller frees the slots.
        """
        if n <= 0:
            return []
        tree = self._tree
        entry_of, leases = tree.entry_of, self._leases
        victims = self.policy.choose_victims(n, _Unleased(entry_of, leases))
        if len(victims) != n:
            return []
        if n == 1 or len(set(victims)) != n:   # one page (a replay's miss): no batch to make
            return [(key, self.remove(key)) for key in victims]
        # Batched: one lease check, the runs trimmed from their tails, one policy call.
        entries = np.fromiter(map(entry_of.__getitem__, victims), dtype=np.int64, count=n)
        if leases[entries].any():
            raise TierIndexError("the policy chose a leased page as a victim")
        slots = tree.slot[entries].tolist()
        tree.remove_many(victims)
        self.policy.on_remove_many(victims)
        return list(zip(victims, slots))

    def lease(self, keys: Iterable[PageKey]) -> list[int]:
        """Protect present keys from eviction until ``release``; leases nest. Returns
        their slots. Raises (and changes nothing) if a key is absent."""
        return self.lease_slots(keys).tolist()

    def lease_slots(self, keys: Iterable[PageKey]) -> np.ndarray:
        """``lease``, the slots as an array (the host store passes them on as one)."""
        entries = self._entries(keys)
        np.add.at(self._leases, entries, _ONE)
        return self._tree.slot[entries]

    def lease_prefix(self, keys: Sequence[PageKey]) -> tuple[int, np.ndarray]:
        """Lease the longest cached prefix of a chain in one walk of its runs: (its
        length, the slots as an array)."""
        parts = [run.buf[p:p + m] for run, p, m in self._tree.segments(keys)]
        if not parts:
            return 0, _NO_SLOTS
        entries = parts[0] if len(parts) == 1 else np.concatenate(parts)
        np.add.at(self._leases, entries, _ONE)
        return len(entries), self._tree.slot[entries]

    def release(self, keys: Iterable[PageKey]) -> list[int]:
        """End one lease per key named (a key named twice ends two); returns their slots.
        Raises (and changes nothing) if a key holds fewer leases than it is named."""
        return self.release_slots(keys).tolist()

    def release_slots(self, keys: Iterable[PageKey]) -> np.ndarray:
        """``release``, the slots as an array."""
        keys = keys if isinstance(keys, list) else list(keys)
        entries = self._entries(keys)
        leases = self._leases
        np.subtract.at(leases, entries, _ONE)
        if len(entries) and leases[entries].min() < 0:
            np.add.at(leases, entries, _ONE)
            short = [k.hex() for k, e in zip(keys, entries) if leases[e] <= 0]
            raise TierIndexError(f"release() of keys that hold no lease: {short[:4]}")
        return self._tree.slot[entries]

    def check_integrity(self) -> None:
        """Raise TierIndexError if capacity, leases, runs or the policy disagree with the map."""
        tree = self._tree
        if len(tree) > self.capacity:
            raise TierIndexError(f"{len(tree)} pages exceed capacity {self.capacity}")
        problem = tree.check()
        if problem:
            raise TierIndexError(problem)
        if (self._leases < 0).any():
            raise TierIndexError("a lease count is negative")
        live = np.zeros(self.capacity, dtype=bool)
        live[list(tree.entry_of.values())] = True
        if self._leases[~live].any():
            raise TierIndexError("a lease is held on a page not in the index")
        if len(self.policy) != len(tree):
            raise TierIndexError(f"policy tracks {len(self.policy)} pages, index holds {len(tree)}")
        check_policy = getattr(self.policy, "check", None)   # a policy with structure of its own
        problem = check_policy() if check_policy is not None else None
        if problem:
            raise TierIndexError(f"eviction policy {self.policy.name}: {problem}")
