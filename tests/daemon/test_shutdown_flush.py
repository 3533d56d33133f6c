"""SIGTERM with more pages due to L3 than the flush deadline allows: the pages that were
written form a usable prefix of every chain (parents first), and the pages lost are
reported at WARNING with their count. (The flush used to write in set order: 128
pages written, 18 usable; and to say so at INFO.)

The L3 is a real disk store that fsyncs every page (milliseconds each on this disk),
so a deadline of 0.2 s cuts the flush of 1,536 pages."""

import json
import os
import signal

import torch

from kvstore.page_keys import page_keys

from daemon_proc import LAYOUT, NAMESPACE, running_daemon
from daemon_worker import tokens

NUM_CHAINS, CHAIN_PAGES = 48, 32


def on_disk(home, key: bytes) -> bool:
    name = key.hex()
    return os.path.exists(os.path.join(home, name[:2], name))


def test_sigterm_flush_cut_by_its_deadline_leaves_usable_prefixes(tmp_path):
    home = tmp_path / "disk"
    args = ["--l3-connector", "disk", "--l3-write-policy", "write_back", "--flush-deadline-s", "0.2",
            "--l3-options", json.dumps({"path": str(home), "capacity_bytes": 1 << 28, "fsync": True})]
    chains = [tokens(100 + c, CHAIN_PAGES) for c in range(NUM_CHAINS)]
    with running_daemon(tmp_path, host_pages=NUM_CHAINS * CHAIN_PAGES, args=args) as daemon:
        with daemon.client(torch.randn(LAYOUT.pool_shape(CHAIN_PAGES))) as cache:
            for chain in chains:
                assert cache.store(chain, range(CHAIN_PAGES)).num_new_pages == CHAIN_PAGES
        assert daemon.stats()["num_l3_written_pages"] == 0     # write_back: all still due
        assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()

    written = [[on_disk(home, k) for k in page_keys(NAMESPACE.digest(), chain, LAYOUT.page_size)]
               for chain in chains]
    num_written = sum(map(sum, written))
    assert 0 < num_written < NUM_CHAINS * CHAIN_PAGES, "the deadline did not cut the flush"
    for flags in written:                                   # no page without its parent
        assert flags == sorted(flags, reverse=True), flags
    # parents first over all chains: chain lengths on disk differ by at most one page
    lengths = [sum(flags) for flags in written]
    assert max(lengths) - min(lengths) <= 1, lengths

    lost = NUM_CHAINS * CHAIN_PAGES - num_written
    warning = [line for line in log.splitlines() if "WARNING" in line and "LOST" in line]
    assert len(warning) == 1, log[-3000:]
    assert f"wrote {num_written} pages back to L3, {lost} pages LOST" in warning[0]
