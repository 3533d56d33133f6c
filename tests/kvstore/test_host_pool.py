import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kvstore.host_pool import HostPool, HostPoolError
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")


@pytest.fixture
def pool():
    with HostPool(LAYOUT, 4) as p:
        yield p


def test_slots_are_page_first_pages_in_shared_memory(pool):
    assert pool.layout.arrangement == "page_first"
    assert pool.tensor.shape == LAYOUT.with_arrangement("page_first").pool_shape(4)
    assert os.path.exists(f"/dev/shm/{pool.name}")
    pool.tensor[2].fill_(7.0)
    raw = bytes(pool.slot_view(2))
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), torch.full((LAYOUT.page_bytes // 4,), 7.0))


def test_another_process_sees_the_bytes(pool):
    pool.tensor[1].fill_(3.5)
    code = (
        "from multiprocessing import shared_memory as s, resource_tracker as r;"
        f"m = s.SharedMemory(name='{pool.name}'); r.unregister(m._name, 'shared_memory');"
        f"import struct; print(struct.unpack_from('<f', m.buf, {LAYOUT.page_bytes})[0]); m.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3.5"


def test_slot_life_cycle_and_leases(pool):
    slots = pool.try_reserve(3)
    assert slots == [0, 1, 2] and pool.num_free == 1
    assert pool.try_reserve(2) is None and pool.num_free == 1
    with pytest.raises(HostPoolError, match="reserved"):
        pool.lease(slots)
    pool.mark_ready(slots)
    pool.lease([1])
    pool.lease([1])
    with pytest.raises(HostPoolError, match="leased"):
        pool.free([0, 1])
    assert pool.state(0) == "ready"  # a refused free changes nothing
    pool.unlease([1])
    pool.unlease([1])
    pool.free(slots)
    with pytest.raises(HostPoolError, match="already free"):
        pool.free([0])
    with pytest.raises(HostPoolError, match="without a lease"):
        pool.unlease([3])
    pool.check_integrity()


def test_close_removes_the_segment():
    pool = HostPool(LAYOUT, 2)
    name = pool.name
    view = pool.tensor  # a live view must not stop the name from going
    pool.close()
    pool.close()
    del view
    assert not os.path.exists(f"/dev/shm/{name}")


def test_two_pools_never_share_a_name():
    with HostPool(LAYOUT, 1) as a, HostPool(LAYOUT, 1) as b:
        assert a.name != b.name


def test_segment_is_removed_when_the_owner_is_killed():
    code = (
        "from kvstore.host_pool import HostPool; from kvstore.layout import KVLayout; import time;"
        "p = HostPool(KVLayout(2, 2, 4, 4, 'float32'), 2); print(p.name, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert os.path.exists(f"/dev/shm/{name}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_slots"):
        HostPool(LAYOUT, 0)


def test_prefault_touches_every_page_of_the_segment():
    import mmap
    import resource

    from kvstore.layout import KVLayout

    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=64, page_size=16, dtype="float32")
    num_slots = (32 << 20) // layout.page_bytes        # 32 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with HostPool(layout, num_slots, pin=False, prefault=True) as pool:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults >= pool.num_slots * pool.slot_bytes // mmap.PAGESIZE * 0.9
        assert not pool.tensor.any()
