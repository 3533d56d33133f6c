"""A copy touches only the pages it was asked to move, whatever the host pool's size.

Measured without timing, by two counters the kernel keeps:

- the host pool's segment is sparse, and a shm page is allocated when first touched
  (read or written), so the segment's allocated bytes are the bytes the copy touched;
- the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) shows any
  temporary the copy made (a contiguous copy of a whole layer, say).

Before the fix the torch reference backend (the CPU default) read a whole layer of
every slot for a one-page load: 64 MiB of a 256 MiB pool here.
"""

from __future__ import annotations

import os

import pytest
import torch

from controller.device_pool import DevicePool
from kvstore.copy_ops import TorchCopyBackend
from kvstore.copy_runs import RunCopyBackend
from kvstore.host_memory import HostMemory, HostMemoryError, check_pool_fits
from kvstore.host_pool import HostPool
from kvstore.layout import KVLayout

POOL_BYTES = 256 << 20
BACKENDS = [TorchCopyBackend(), RunCopyBackend()]
LIMIT = 4 << 20   # far above two pages, far below one layer of the pool (64 MiB)


def layout_of(arrangement: str, mla: bool) -> KVLayout:
    return KVLayout(num_layers=4, num_kv_heads=1 if mla else 2, head_dim=64, page_size=16,
                    dtype="bfloat16", arrangement=arrangement, is_mla=mla)


def segment_bytes(pool: HostPool) -> int:
    """Bytes of the segment the kernel has allocated: the pages something touched."""
    return os.stat(f"/dev/shm/{pool.name}").st_blocks * 512


def reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current RSS
    return peak_rss()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024


@pytest.fixture
def big_pool(request):
    layout = request.param
    pool = HostPool(layout, POOL_BYTES // layout.page_bytes, pin=False)
    yield layout, pool
    pool.close()


CASES = [layout_of(a, m) for a in ("layer_first", "page_first") for m in (False, True)]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("big_pool", CASES, indirect=True,
                         ids=lambda l: f"{l.arrangement}{'-mla' if l.is_mla else ''}")
def test_one_page_copies_touch_one_page(backend, big_pool):
    layout, host = big_pool
    engine = torch.randn(layout.pool_shape(8)).to(layout.torch_dtype)
    slot = host.num_slots // 2
    backend.copy_pages(engine, layout, [3], host.tensor, host.layout, [slot])  # warm up torch
    start_peak = reset_peak_rss()
    backend.copy_pages(engine, layout, [5], host.tensor, host.layout, [slot + 1])
    backend.plan_layers(engine, layout, [6], host.tensor, host.layout, [slot + 2]).launch_all()
    out = torch.zeros_like(engine)
    backend.copy_pages(host.tensor, host.layout, [slot + 1], out, layout, [0])
    plan = backend.plan_layers(host.tensor, host.layout, [slot + 2], out, layout, [1])
    for layer in range(layout.num_layers):
        plan.launch(layer)
    # Bit-exact both ways, and nothing beyond the three slots was touched.
    assert torch.equal(as_page(out, layout, 0), as_page(engine, layout, 5))
    assert torch.equal(as_page(out, layout, 1), as_page(engine, layout, 6))
    assert segment_bytes(host) <= 3 * layout.page_bytes + 3 * 8192
    assert peak_rss() - start_peak < LIMIT


def as_page(pool: torch.Tensor, layout: KVLayout, page: int) -> torch.Tensor:
    """One page's bytes of every layer, as a flat uint8 tensor."""
    view = pool[:, :, page] if layout.arrangement == "layer_first" else pool[page]
    return view.contiguous().view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("big_pool", CASES, indirect=True,
                         ids=lambda l: f"{l.arrangement}{'-mla' if l.is_mla else ''}")
def test_device_pool_load_and_save_touch_only_their_pages(big_pool):
    """The client's path (embedded and daemon alike): DevicePool with the CPU default backend."""
    layout, host = big_pool
    engine = torch.randn(layout.pool_shape(8)).to(layout.torch_dtype)
    device = DevicePool(layout, engine, None)
    device.save([2], host, [7])   # warm up
    start_peak = reset_peak_rss()
    device.save([4], host, [host.num_slots - 1])
    (engine[:, :, 1] if layout.arrangement == "layer_first" else engine[1]).zero_()
    device.load(host, [host.num_slots - 1], [1]).wait_all()
    assert torch.equal(as_page(engine, layout, 1), as_page(engine, layout, 4))
    assert segment_bytes(host) <= 2 * layout.page_bytes + 2 * 8192
    assert peak_rss() - start_peak < LIMIT


# ---- the pool must fit the machine ---------------------------------------------------------
GIB = 1 << 30


def test_a_pool_larger_than_physical_memory_is_refused_with_the_numbers():
    memory = HostMemory(physical_bytes=24 * GIB, available_bytes=20 * GIB, shm_free_bytes=12 * GIB)
    with pytest.raises(HostMemoryError, match=r"65536 pages of 2.00 MiB \(128.0 GiB\).*physical "
                                              r"memory \(24.0 GiB\).*lower host_pool_pages"):
        check_pool_fits(65536, 2 << 20, memory)


def test_a_pool_larger_than_the_shm_filesystem_is_refused():
    memory = HostMemory(physical_bytes=24 * GIB, available_bytes=20 * GIB, shm_free_bytes=64 << 20)
    with pytest.raises(HostMemoryError, match=r"free space of /dev/shm.*at most 32.*--shm-size"):
        check_pool_fits(100, 2 << 20, memory)


def test_a_pool_larger_than_available_memory_is_a_warning(caplog):
    memory = HostMemory(physical_bytes=24 * GIB, available_bytes=2 * GIB, shm_free_bytes=12 * GIB)
    check_pool_fits(2048, 2 << 20, memory)   # 4 GiB: fits the machine, not what is free now
    assert "exceeds the memory available now (2.0 GiB of 24.0 GiB)" in caplog.text
    caplog.clear()
    check_pool_fits(512, 2 << 20, memory)
    assert not caplog.records


def test_host_pool_refuses_before_creating_a_segment():
    layout = layout_of("layer_first", False)
    too_many = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // layout.page_bytes + 1
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(HostMemoryError, match="physical memory"):
        HostPool(layout, too_many, pin=False)
    assert set(os.listdir("/dev/shm")) == before
