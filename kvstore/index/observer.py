"""What a tier tells the outside about its contents: pages that entered, pages that left.

A ``TierObserver`` is called at the insert/remove boundary of a tier
(``HostStore.commit``, ``reserve``'s evictions, ``discard`` for L2), after the
index changed, with the caller's lock held: it must only record (append to a
list), never block or call back into the tier. The daemon's KV-event publisher
(controller/events) is one; ``NULL_OBSERVER`` is the default and costs one
no-op call per batch of pages when nobody listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from kvstore.page_keys import PageKey


class TierObserver(Protocol):
    def stored(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        """``keys`` (one chain, in order; ``keys[0]`` follows ``parent``, None at a
        chain's start or where unknown) entered the tier."""

    def removed(self, keys: Sequence[PageKey]) -> None:
        """``keys`` left the tier (evicted or discarded)."""


class NullObserver:
    """Nobody listens: nothing is recorded."""

    __slots__ = ()

    def stored(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        pass

    def removed(self, keys: Sequence[PageKey]) -> None:
        pass


NULL_OBSERVER = NullObserver()


@dataclass(frozen=True)
class CoreObservers:
    """The observers of one cache core's tiers: L2 (its host store) and L3 (what the
    core learns of its store: pages it wrote, pages it found missing)."""

    l2: TierObserver = NULL_OBSERVER
    l3: TierObserver = NULL_OBSERVER


NO_OBSERVERS = CoreObservers()
