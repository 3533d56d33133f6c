"""Parking: a flat policy's page taken out of its queues while it has a cached child.

Adaptive's leaf guard holds LRU, S3-FIFO and ARC to the prefix rule. A page
with a cached child must not be a victim; rather than show it as not
evictable (the policy then steps past it on every eviction, thousands of
pages for a long prompt) the guard parks it: the page leaves its queue and
``parked`` remembers which one, keeping the policy's other state (hit counts)
as it is. When its last child leaves, it goes back at that queue's oldest
end, so it is the next page looked at. Each queue is an ``OrderedDict`` of
key -> None, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from kvstore.page_keys import PageKey


def park(key: PageKey, queues: Sequence[OrderedDict], parked: dict[PageKey, int]) -> None:
    """Take ``key`` out of the queue that holds it; ``parked[key]`` names that queue."""
    for i, queue in enumerate(queues):
        if queue.pop(key, False) is None:
            parked[key] = i
            return


def unpark(key: PageKey, queues: Sequence[OrderedDict], parked: dict[PageKey, int]) -> None:
    """Put a parked ``key`` back at the oldest end of its queue (nothing if not parked)."""
    i = parked.pop(key, None)
    if i is not None:
        queue = queues[i]
        queue[key] = None
        queue.move_to_end(key, last=False)
