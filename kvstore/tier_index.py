"""TierIndex: which pages one tier holds, where, who is reading them, and what goes next.

The index maps a page key to a slot number (a host-pool slot for L2; any int
for a simulated tier) and keeps lease counts. Capacity is a hard limit: an
insert into a full index raises, so callers evict first (``evict(n)`` frees
exactly ``n`` or nothing). Which pages go is the policy's choice; leased pages
are never offered to it as evictable.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from kvstore.eviction import EvictionPolicy, make_policy
from kvstore.page_keys import PageKey


class TierIndexError(RuntimeError):
    """An index operation broke its rules (duplicate insert, full index, leased removal)."""


class TierIndex:
    """Key -> slot map of one tier with leases, prefix matching and policy-driven eviction."""

    __slots__ = ("capacity", "policy", "_slots", "_leases", "_parent_of", "_children")

    def __init__(self, capacity: int, policy: EvictionPolicy | str = "lru") -> None:
        if capacity <= 0:
            raise ValueError(f"TierIndex capacity must be > 0 pages, got {capacity}")
        self.capacity = capacity
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.policy.set_capacity(capacity)
        self._slots: dict[PageKey, int] = {}
        self._leases: dict[PageKey, int] = {}  # only keys with a lease > 0
        # The chain links of cached pages, whether or not the parent is cached, so a
        # parent that arrives after its children (they were fetched first, or it was
        # evicted and comes back) is linked to them: child -> parent, parent -> children.
        self._parent_of: dict[PageKey, PageKey] = {}
        self._children: dict[PageKey, set[PageKey]] = {}

    # ---- queries (change nothing) -------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: PageKey) -> bool:
        return key in self._slots

    @property
    def num_free(self) -> int:
        return self.capacity - len(self._slots)

    def get(self, key: PageKey) -> int | None:
        """The slot of ``key``, or None if this tier does not hold it."""
        return self._slots.get(key)

    def get_many(self, keys: Iterable[PageKey]) -> list[int | None]:
        """The slot of each key (None where absent), in one pass without a Python loop."""
        return list(map(self._slots.get, keys))

    def match_prefix(self, keys: Sequence[PageKey]) -> int:
        """How many leading keys of a chain this tier holds. Changes nothing."""
        slots = self._slots
        for i, key in enumerate(keys):
            if key not in slots:
                return i
        return len(keys)

    def slots_of(self, keys: Iterable[PageKey]) -> list[int]:
        """Slots of present keys; raises KeyError for an absent one."""
        slots = self._slots
        return [slots[k] for k in keys]

    def is_leased(self, key: PageKey) -> bool:
        return key in self._leases

    def lease_count(self, key: PageKey) -> int:
        return self._leases.get(key, 0)

    def items(self) -> Iterable[tuple[PageKey, int]]:
        """(key, slot) pairs; do not change the index while iterating."""
        return self._slots.items()

    # ---- changes ------------------------------------------------------------
    def touch(self, keys: Iterable[PageKey]) -> None:
        """Record a hit on each key (it must be present)."""
        on_access = self.policy.on_access
        for key in keys:
            on_access(key)

    def insert(self, key: PageKey, slot: int, parent: PageKey | None = None) -> None:
        """Add ``key`` at ``slot``. Raises if it is present or the index is full."""
        if key in self._slots:
            raise TierIndexError(f"key {key.hex()} is already in the index; touch() it instead")
        if len(self._slots) >= self.capacity:
            raise TierIndexError(f"index is full ({self.capacity} pages): evict() before insert()")
        self._slots[key] = slot
        if parent is not None:
            self._parent_of[key] = parent
            self._children.setdefault(parent, set()).add(key)
        self.policy.on_insert(key, parent if parent in self._slots else None)
        for child in self._children.get(key, ()):
            self.policy.on_link(child, key)

    def remove(self, key: PageKey) -> int:
        """Drop ``key`` and return its slot. Raises if it is absent or leased."""
        if key in self._leases:
            raise TierIndexError(f"key {key.hex()} is leased; release it before removing")
        slot = self._slots.pop(key)
        self.policy.on_remove(key)
        parent = self._parent_of.pop(key, None)
        if parent is not None:
            siblings = self._children[parent]
            siblings.discard(key)
            if not siblings:
                del self._children[parent]
        return slot

    def evict(self, n: int) -> list[tuple[PageKey, int]]:
        """Remove exactly ``n`` unleased pages chosen by the policy, or none.

        Returns the (key, slot) pairs removed; the caller frees the slots.
        """
        if n <= 0:
            return []
        leases = self._leases
        victims = self.policy.choose_victims(n, lambda k: k not in leases)
        if len(victims) != n:
            return []
        return [(key, self.remove(key)) for key in victims]

    def lease(self, keys: Iterable[PageKey]) -> None:
        """Protect present keys from eviction until ``release``; leases nest."""
        keys = list(keys)
        missing = [k.hex() for k in keys if k not in self._slots]
        if missing:
            raise TierIndexError(f"lease() of keys not in the index: {missing[:4]}")
        for key in keys:
            self._leases[key] = self._leases.get(key, 0) + 1

    def release(self, keys: Iterable[PageKey]) -> None:
        for key in keys:
            count = self._leases.get(key, 0)
            if count <= 0:
                raise TierIndexError(f"release() of key {key.hex()} that holds no lease")
            if count == 1:
                del self._leases[key]
            else:
                self._leases[key] = count - 1

    def check_integrity(self) -> None:
        """Raise TierIndexError if capacity, leases or the policy disagree with the map."""
        if len(self._slots) > self.capacity:
            raise TierIndexError(f"{len(self._slots)} pages exceed capacity {self.capacity}")
        stray = [k for k in self._leases if k not in self._slots]
        if stray:
            raise TierIndexError(f"{len(stray)} leases on keys not in the index")
        if any(c <= 0 for c in self._leases.values()):
            raise TierIndexError("a lease count is not positive")
        if any(k not in self._slots for k in self._parent_of) or any(
                c not in self._slots for children in self._children.values() for c in children):
            raise TierIndexError("a chain link names a page that is not cached")
        if len(self.policy) != len(self._slots):
            raise TierIndexError(
                f"policy tracks {len(self.policy)} pages, index holds {len(self._slots)}"
            )
