"""The daemon's lookup counters on a daemon of several layouts: each lookup's bytes are
counted in its own pool's page size, also when its open pages are closed later by a
lookup of another pool."""

from __future__ import annotations

import time

from controller.daemon.lookup_counts import LookupCounts
from controller.daemon.metrics import DaemonMetrics


def counted(metrics: DaemonMetrics, tier: str) -> float:
    return metrics.registry.get_sample_value("kvstore_lookup_bytes_total", {"tier": tier})


def test_bytes_follow_each_lookups_pool():
    metrics = DaemonMetrics()
    counts = LookupCounts(metrics)
    small, large = 1_000, 50_000
    # session a: 4 pages of the small pool, 1 in L2, 3 pending on a prefetch (left open)
    counts.observe(b"a", 4, 1, 0, 3, 7, counts.take(b"a", 0), time.perf_counter(), small)
    # session a again, in the large pool, not following the prefetch: the 3 open pages
    # close as misses, in the small pool's size
    counts.observe(b"a", 2, 2, 0, 0, 0, counts.take(b"a", 0), time.perf_counter(), large)
    assert counted(metrics, "l2") == 1 * small + 2 * large
    assert counted(metrics, "miss") == 3 * small
