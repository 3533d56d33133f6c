"""One engine lookup, counted once in the daemon's metrics, though it may take two requests.

A client that waits for L3 pages (policies wait_complete, timeout) sends a Lookup,
which leases the L2 prefix and starts a prefetch, waits on that prefetch, then
sends a second Lookup that ``follows`` the first (its prefetch id)::

    Lookup(keys)              -> hit h1, p pages pending     counted: 1 lookup, its L2 and L3 hits
    WaitPrefetch(id)
    Lookup(keys, follows=id)  -> hit h2                      counted: h2 - h1 L3 hits, the rest misses

The pages after the first hit stay *open* until the follow-up comes. A client that
does not wait (best_effort) or whose prefetch brought nothing never follows up: its
open pages count as misses when the session's next lookup arrives or the session
ends. So every page asked is counted once, as an L2 hit, an L3 hit or a miss.
The core's CacheStats count the same way (``CacheCore.lookup``'s ``num_counted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from controller.daemon.metrics import DaemonMetrics


@dataclass(frozen=True, slots=True)
class OpenLookup:
    """The first half of a lookup whose pending pages are not counted yet."""

    prefetch_id: int
    num_hit: int
    num_open: int       # pages after the hit: L3 hits or misses once the follow-up comes
    started: float      # perf_counter at the first request
    page_bytes: int     # of the pool it looked up (a daemon of every layout has several)


class LookupCounts:
    """Each session's open lookup (at most one: a client's lookups are sequential)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics
        self._open: dict[bytes, OpenLookup] = {}

    def take(self, session_id: bytes, follows: int) -> OpenLookup | None:
        """The open lookup that a Lookup following prefetch ``follows`` completes, or None
        (a new lookup); any other open lookup of the session is closed as misses."""
        found = self._open.pop(session_id, None)
        if found is not None and follows and found.prefetch_id == follows:
            return found
        if found is not None:
            self._count("miss", found.num_open, found.page_bytes)
        return None

    def observe(self, session_id: bytes, num_keys: int, num_l2: int, num_l3: int,
                num_pending: int, prefetch_id: int, first: OpenLookup | None,
                started: float, page_bytes: int) -> None:
        """Count a Lookup's answer (``first``: what ``take`` returned for it) in pages of
        ``page_bytes``, the looked-up pool's."""
        m, now = self._metrics, time.perf_counter()
        num_hit = num_l2 + num_l3
        if first is not None:
            came_up = min(max(0, num_hit - first.num_hit), first.num_open)
            self._count("l3", came_up, first.page_bytes)
            self._count("miss", first.num_open - came_up, first.page_bytes)
            if came_up:
                m.l3_fetch_seconds.observe(now - first.started)
            return
        m.lookups.inc()
        m.lookup_seconds.observe(now - started)
        self._count("l2", num_l2, page_bytes)
        self._count("l3", num_l3, page_bytes)
        if num_pending and prefetch_id:
            self._open[session_id] = OpenLookup(prefetch_id, num_hit, num_keys - num_hit, started,
                                                page_bytes)
        else:
            self._count("miss", num_keys - num_hit, page_bytes)
        if num_l3:
            m.l3_fetch_seconds.observe(now - started)

    def close_ended(self, live_sessions: Iterable[bytes]) -> None:
        """Count the open pages of sessions that ended (Goodbye, reaped) as misses."""
        live = set(live_sessions)
        for session_id in [s for s in self._open if s not in live]:
            ended = self._open.pop(session_id)
            self._count("miss", ended.num_open, ended.page_bytes)

    def _count(self, tier: str, num_pages: int, page_bytes: int) -> None:
        if num_pages > 0:
            self._metrics.lookup_pages[tier].inc(num_pages)
            self._metrics.lookup_bytes[tier].inc(num_pages * page_bytes)
