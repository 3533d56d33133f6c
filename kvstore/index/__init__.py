"""The L2 tier's index room: names, places, leases and eviction state of cached pages.

- :mod:`kvstore.index.runs`: ``RunTree``, runs of chained pages as radix nodes
  over flat per-entry arrays (the structure lookups walk).
- :mod:`kvstore.index.tier_index`: ``TierIndex``, the tree plus leases (a flat
  array) and the eviction policy, for one tier (L2, or a replayed tier).
- :mod:`kvstore.index.host_store`: ``HostStore``, a ``HostPool``'s slots named
  by a ``TierIndex`` (the L2 tier).
"""

from kvstore.index.tier_index import TierIndex, TierIndexError

__all__ = ["TierIndex", "TierIndexError"]
