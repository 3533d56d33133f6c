"""8 engine processes doing random lookup / load / store / release against one daemon
for 60 s: no request misses its deadline, no client is declared dead, and afterwards no
slot or lease is left over and the cache checks out."""

import json
import time

import pytest

from daemon_proc import running_daemon, spawn_worker

NUM_WORKERS = 8
SECONDS = 60


@pytest.mark.slow
def test_eight_clients_for_a_minute_leak_nothing(tmp_path):
    # 48 pages of L2 for 40 prompts of up to 24 pages: eviction and skipped stores happen.
    with running_daemon(tmp_path, host_pages=48) as daemon:
        workers = [spawn_worker(daemon, "stress", str(SECONDS), str(i)) for i in range(NUM_WORKERS)]
        try:
            deadline = time.monotonic() + SECONDS + 90
            outputs = [w.communicate(timeout=max(deadline - time.monotonic(), 1)) for w in workers]
        finally:
            for w in workers:
                w.kill()
                w.wait(10)
        counts = []
        for w, (out, err) in zip(workers, outputs):
            assert w.returncode == 0, err[-2000:]
            counts.append(json.loads(out.strip().splitlines()[-1]))
        assert all(c["timeouts"] == 0 for c in counts), counts
        assert sum(c["lookup"] for c in counts) > 1000
        assert sum(c["hit_pages"] for c in counts) > 0  # pages stored by one are hit by others
        stats = daemon.stats()
        assert stats["num_reaped_clients"] == 0
        assert (stats["num_leases"], stats["num_reservations"], stats["num_reserved_slots"]) == (0, 0, 0)
        assert stats["num_clients"] == 1  # the stats session
        daemon.check_integrity(quiescent=True)
