"""Each lookup is counted once, its pages as L2 hits, L3 hits or misses, in both modes,
with a disk L3: in ``stats()``, in ``kvstore status`` and in the daemon's Prometheus
metrics. (The daemon's client looks up twice when it waits on L3: before and after
the prefetch; that used to count as two lookups, L2 hits and misses.)"""

import json
import random
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch

from controller.config import ControllerConfig, L3Config, PrefetchConfig
from controller.embedded import EmbeddedController

from daemon_proc import LAYOUT, NAMESPACE, REPO, child_env, running_daemon, wait_until

P = LAYOUT.page_size
COUNTERS = ("num_lookups", "num_lookup_pages", "num_l2_hit_pages", "num_l3_hit_pages")


def tokens(seed: int, num_pages: int) -> list[int]:
    return random.Random(seed).choices(range(5000), k=num_pages * P)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counters(cache) -> dict[str, int]:
    stats = cache.stats()
    return {name: getattr(stats, name) for name in COUNTERS}


def delta(after: dict, before: dict) -> tuple[int, ...]:
    return tuple(after[k] - before[k] for k in COUNTERS)


def fill_disk_and_evict(cache, stats_of) -> None:
    """Chains 1..3 of 6 pages through an L2 of 8 (write_through: all on disk at once);
    chain 1 ends up only on disk."""
    for seed in (1, 2, 3):   # each on disk before the next (pages due to L3 are not evicted)
        assert cache.store(tokens(seed, 6), range(6 * (seed - 1), 6 * seed)).num_new_pages == 6
        assert wait_until(lambda: stats_of()["num_l3_written_pages"] == 6 * seed, timeout_s=20)


def disk_args(tmp_path) -> L3Config:
    return L3Config("disk", {"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 26},
                    write_policy="write_through")


def check_lookup_counts(cache) -> None:
    """The scenario both modes share: a lookup wholly from L3, then one half from each."""
    before = counters(cache)
    result = cache.lookup(tokens(1, 6))                 # chain 1: only on disk
    assert (result.num_l2_pages, result.num_l3_pages) == (0, 6)
    cache.release(result)
    mid = counters(cache)
    assert delta(mid, before) == (1, 6, 0, 6)           # one lookup, 6 L3 hits, no miss

    fill = cache.lookup(tokens(2, 3))                   # chain 2's first half back in L2
    cache.release(fill)
    mid = counters(cache)
    result = cache.lookup(tokens(2, 6))
    assert (result.num_l2_pages, result.num_l3_pages) == (3, 3)
    cache.release(result)
    assert delta(counters(cache), mid) == (1, 6, 3, 3)


def test_embedded_counts_each_lookup_once(tmp_path):
    pool = torch.randn(LAYOUT.pool_shape(32))
    config = ControllerConfig(host_pool_pages=8, l3=disk_args(tmp_path))
    with EmbeddedController(config, NAMESPACE, pool) as cache:
        fill_disk_and_evict(cache, lambda: {"num_l3_written_pages": cache.stats().num_l3_written_pages})
        check_lookup_counts(cache)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(kvstore_lookups_total|kvstore_lookup_pages_total\{tier="(\w+)"\}) (\S+)$', line)
        if m:
            out[m.group(2) or "lookups"] = float(m.group(3))
    return out


def status_json(address: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--address", address,
                           "--json"], env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_daemon_counts_each_lookup_once_in_stats_status_and_metrics(tmp_path):
    l3 = disk_args(tmp_path)
    port = free_port()
    args = ["--l3-connector", "disk", "--l3-write-policy", "write_through", "--l3-options",
            json.dumps(dict(l3.options)), "--metrics-port", str(port)]
    with running_daemon(tmp_path, host_pages=8, args=args) as daemon:
        cache = daemon.client(torch.randn(LAYOUT.pool_shape(32)))
        fill_disk_and_evict(cache, daemon.stats)
        metrics_before, status_before = scrape(port), status_json(daemon.address)
        check_lookup_counts(cache)
        status = status_json(daemon.address)
        assert delta(status, status_before) == (3, 15, 3, 12)   # the three lookups above
        metrics = scrape(port)
        assert {k: metrics.get(k, 0) - metrics_before.get(k, 0)
                for k in ("lookups", "l2", "l3", "miss")} == {"lookups": 3, "l2": 3, "l3": 12, "miss": 0}

        # best_effort answers at once: pages still coming are misses of that lookup,
        # in the metrics once the session looks up again or ends.
        eager = daemon.client(torch.zeros(LAYOUT.pool_shape(32)),
                              prefetch=PrefetchConfig(policy="best_effort"))
        before = counters(cache)
        quick = eager.lookup(tokens(3, 6))              # chain 3 was evicted by chains 1 and 2
        # (a read may land before the daemon answers: those few are L3 hits)
        num_l3 = quick.num_l3_pages
        assert quick.num_l2_pages == 0 and num_l3 + quick.num_pending_pages == 6
        eager.release(quick)
        assert delta(counters(cache), before) == (1, 6, 0, num_l3)
        eager.close()
        assert wait_until(lambda: scrape(port).get("miss", 0) - metrics_before.get("miss", 0)
                          == 6 - num_l3, timeout_s=10)
        assert scrape(port)["lookups"] - metrics_before["lookups"] == 4
        cache.close()
        daemon.check_integrity(quiescent=True)
