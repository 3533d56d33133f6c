"""Belady's offline optimum as an eviction policy: evict the page used farthest in the future.

It runs through the same :class:`~kvstore.index.tier_index.TierIndex` as every
online policy, so the bound and the policies are measured by one replay. It
knows the future because it is built from the trace; it is not registered for
the service (no online cache can know the future).

The replay calls exactly one ``on_insert`` or ``on_access`` per block
reference, in trace order; the policy walks the trace with a cursor in step
with those calls and raises :class:`BeladyOutOfStep` if a call names another
key than the trace does at that point -- the bound is only meaningful for the
trace it was built from, replayed in order.

Priorities (larger goes first)::

    next_use[p] = position of the next reference to refs[p]'s key after p,
                  or NEVER (past the end) if there is none

Positions are unique, so a page and its parent referenced by the same future
request differ: the child comes later in that request, so it goes first. That
keeps the prefix rule (a parent is never evicted before a child that is
needed at the same time) without a special case.

Caveat: farthest-next-use is provably optimal for plain demand paging. Under
our definition (every page of a request is inserted, hits count only up to
the first miss) it is the customary bound rather than a proven one; an
online policy could in principle beat it on some trace (none does on ours).
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey


class BeladyOutOfStep(RuntimeError):
    """The policy was told about another key than the trace references next."""


def next_use_positions(refs: Sequence[PageKey]) -> list[int]:
    """For each position, the position of the same key's next reference, or ``len(refs)``."""
    never = len(refs)
    out = [never] * never
    seen: dict[PageKey, int] = {}
    for pos in range(never - 1, -1, -1):
        key = refs[pos]
        out[pos] = seen.get(key, never)
        seen[key] = pos
    return out


class BeladyPolicy(EvictionPolicy):
    """Clairvoyant policy over a fixed reference stream (see the module docstring)."""

    name = "belady"

    def __init__(self, refs: Sequence[PageKey]) -> None:
        self._refs = refs
        self._next = next_use_positions(refs)
        self._pos = 0
        self._next_of: dict[PageKey, int] = {}  # cached key -> its next use
        # Max-heap by next use, as (-next_use, key); entries go stale when a key
        # is used again or removed and are dropped when they surface.
        self._heap: list[tuple[int, PageKey]] = []

    def _advance(self, key: PageKey) -> None:
        pos = self._pos
        if pos >= len(self._refs) or self._refs[pos] != key:
            raise BeladyOutOfStep(
                f"reference {pos}: told about {key.hex()}, the trace has "
                f"{self._refs[pos].hex() if pos < len(self._refs) else 'ended'}"
            )
        self._pos = pos + 1
        nxt = self._next[pos]
        self._next_of[key] = nxt
        heapq.heappush(self._heap, (-nxt, key))

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._advance(key)

    def on_access(self, key: PageKey) -> None:
        self._advance(key)

    def on_remove(self, key: PageKey) -> None:
        del self._next_of[key]

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        heap, next_of = self._heap, self._next_of
        popped: list[tuple[int, PageKey]] = []
        victims: list[PageKey] = []
        while heap and len(victims) < n:
            entry = heapq.heappop(heap)
            neg_next, key = entry
            if next_of.get(key) != -neg_next:
                continue  # stale: the key was used again or removed since
            popped.append(entry)
            if is_evictable(key):
                victims.append(key)
        for entry in popped:  # choose_victims changes no state
            heapq.heappush(heap, entry)
        return victims if len(victims) == n else []

    def __len__(self) -> int:
        return len(self._next_of)
