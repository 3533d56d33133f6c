"""Where ``TierIndex`` used to live; it is in :mod:`kvstore.index.tier_index` now."""

from kvstore.index.tier_index import TierIndex, TierIndexError

__all__ = ["TierIndex", "TierIndexError"]
