"""The ``auto`` policy on the daemon's client side.

The daemon never waits on L3 inside a request, so a daemon client applies its prefetch
policy itself (controller/client.py, ``DaemonLink.lookup``). With ``auto`` it plans with
a cost model of its own: the prefill rates its engine reports to it, and the L3 rates
the daemon's prefetcher measured (read from the daemon's stats, at most once a second).
What its lookups hand out is counted here and sent to the daemon (``CountLoads``) with
the same cadence, so the daemon's stats() and metrics show every client's choices.
"""

from __future__ import annotations

import time
from typing import Callable

from controller.config import PrefetchConfig
from controller.daemon import protocol as p
from controller.pipelines.cost_model import Progress, new_cost_model, wait_auto

_REFRESH_S = 1.0   # how often the daemon's L3 rates are read and counts are sent


class ClientChoice:
    """One daemon client's cost model, its wait on the daemon's prefetches and its counts."""

    def __init__(self, prefetch: PrefetchConfig, page_size: int, page_bytes: int) -> None:
        self.config = prefetch
        self.page_size = page_size
        self.cost = new_cost_model(prefetch, page_size, page_bytes)
        self._unsent = [0, 0, 0]   # loaded from L2, loaded from L3, recomputed by choice
        self._last_refresh = -_REFRESH_S

    @property
    def is_auto(self) -> bool:
        return self.config.policy == "auto"

    def wait(self, reply: p.LookupReply, num_tokens: int,
             call_prefetch: Callable[[p.Message, float], p.Message], backstop_s: float) -> bool:
        """Wait on the daemon's prefetch while the model says it pays; whether any page
        arrived (then the caller looks up again)."""
        hit = reply.num_l2 + reply.num_l3
        last = Progress(hit, reply.num_pending)

        def poll(wait_s: float) -> Progress:
            nonlocal last
            if not wait_s:
                return last
            got = call_prefetch(p.WaitPrefetch(reply.prefetch_id, wait_s), wait_s)
            if type(got) is not p.PrefetchReply:   # forgotten (restart, reaped): nothing comes
                last = Progress(last.num_ready, 0, False, True)
            else:
                last = Progress(hit + got.num_ready, got.num_pending, False, got.is_done)
            return last

        wait_auto(self.cost, num_tokens, poll, backstop_s)
        return last.num_ready > hit

    def choose(self, reply: p.LookupReply, num_tokens: int) -> p.LookupReply:
        """The reply cut to the leading pages worth loading; counts what it hands out."""
        num_hit = reply.num_l2 + reply.num_l3
        # A miss has nothing to choose: no plan on its path (0% cached).
        keep = self.cost.plan(num_tokens, num_hit, 0).num_pages if self.is_auto and num_hit else num_hit
        num_l2 = min(reply.num_l2, keep)
        self._unsent[0] += num_l2
        self._unsent[1] += keep - num_l2
        if self.is_auto:
            self._unsent[2] += num_hit - keep + reply.num_pending
        if keep == num_hit:
            return reply
        return p.LookupReply(reply.lease_id, num_l2, keep - num_l2, reply.slots[: 4 * keep],
                             reply.num_pending, reply.prefetch_id, reply.generations[: 4 * keep])

    def send_counts(self, call: Callable[[p.Message], p.Message]) -> None:
        """Send what was counted since the last time (nothing when there is nothing)."""
        if any(self._unsent):
            counts, self._unsent = self._unsent, [0, 0, 0]
            call(p.CountLoads(*counts))

    def refresh(self, call: Callable[[p.Message], p.Message], force: bool = False) -> None:
        """Send the counts and read the daemon's L3 rates, at most once a second."""
        now = time.monotonic()
        if not force and now - self._last_refresh < _REFRESH_S:
            return
        self._last_refresh = now
        self.send_counts(call)
        if self.is_auto:
            stats = call(p.GetStats())
            if type(stats) is p.StatsReply and stats.stats.get("l3_read_gbps"):
                self.cost.l3.assume(float(stats.stats.get("l3_read_latency_s", 0.0)),
                                    float(stats.stats["l3_read_gbps"]))
