"""An engine attached to the daemon touches only the slots it loads and stores, however
large the daemon's host pool: its memory does not grow with the pool. (A one-page load
used to read a whole layer of every slot through the mapped segment: 21 / 424 / 1,196 ms
for a 16 MiB / 256 MiB / 1 GiB pool, and as much resident memory.)"""

import torch

from daemon_proc import LAYOUT, running_daemon
from daemon_worker import tokens

POOL_BYTES = 256 << 20


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def test_load_and_store_touch_only_their_slots_of_a_large_pool(tmp_path):
    with running_daemon(tmp_path, host_pages=POOL_BYTES // LAYOUT.page_bytes) as daemon:
        pool = torch.randn(LAYOUT.pool_shape(8))
        with daemon.client(pool) as cache:
            assert cache.store(tokens(1, 2), [0, 1]).num_new_pages == 2   # warm up every path
            result = cache.lookup(tokens(1, 2))
            cache.load(result, [2, 3]).wait_all()
            cache.release(result)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                     # peak RSS := RSS now
            shared_before, peak_before = status_kib("RssShmem"), status_kib("VmHWM")

            assert cache.store(tokens(2, 1), [4]).num_new_pages == 1
            result = cache.lookup(tokens(2, 1))
            cache.load(result, [5]).wait_all()
            cache.release(result)
            assert torch.equal(pool[:, :, 5], pool[:, :, 4])
            # One page is 768 bytes; a layer of this pool is 85 MiB.
            assert status_kib("RssShmem") - shared_before < 1024
            assert status_kib("VmHWM") - peak_before < 4096
