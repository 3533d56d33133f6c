"""CUDA copy paths (SM kernel, batched DMA, staged, auto) against the torch reference,
bit for bit, with the shm HostPool (cudaHostRegister'd) as the host side."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvstore.copy_ops import CopyArgumentError, CudaPathPolicy, TorchCopyBackend, copy_backend_for
from kvstore.host_pool import HostPool
from kvstore.layout import KVLayout

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NAMES = ["cuda_sm", "cuda_dma", "cuda_staged", "cuda"]
LAYOUTS = {
    "mha": KVLayout(4, 2, 64, 16),
    "mla": KVLayout(3, 1, 72, 8, is_mla=True),
    "odd": KVLayout(2, 3, 3, 5, dtype="uint8"),  # 45-byte chunks: 1-byte accesses
}
REFERENCE = TorchCopyBackend()


def random_bytes(numel_bytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (numel_bytes,), dtype=torch.uint8, generator=gen)


def fill_random(t: torch.Tensor, seed: int) -> None:
    flat = t.reshape(-1).view(torch.uint8)
    flat.copy_(random_bytes(flat.numel(), seed))


def with_run(perm: torch.Tensor, run: range) -> torch.Tensor:
    """``perm`` with the pages of ``run`` moved to positions 3.., consecutive (so runs coalesce)."""
    rest = perm[(perm < run.start) | (perm >= run.stop)]
    return torch.cat([rest[:3], torch.arange(run.start, run.stop), rest[3:]])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).cpu()


def check_copy(backend, src, src_layout, src_pages, dst, dst_layout, dst_pages, layer, stream=None):
    """Run ``backend`` and the CPU reference on copies of the same pools; compare bytes."""
    want = dst.cpu().clone()
    REFERENCE.copy_pages(src.cpu(), src_layout, src_pages, want, dst_layout, dst_pages, layer=layer)
    backend.copy_pages(src, src_layout, src_pages, dst, dst_layout, dst_pages, layer=layer, stream=stream)
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(dst), as_bytes(want))


@pytest.fixture(scope="module")
def pools():
    """Per layout: a device pool of 40 pages in each arrangement, and a pinned shm HostPool of 24 slots."""
    made = {}
    for key, layout in LAYOUTS.items():
        host = HostPool(layout, num_slots=24)
        assert host.is_pinned
        devs = {}
        for arr in ("layer_first", "page_first"):
            lay = layout.with_arrangement(arr)
            devs[arr] = (torch.empty(lay.pool_shape(40), dtype=lay.torch_dtype, device="cuda"), lay)
        made[key] = (host, devs)
    yield made
    for host, _ in made.values():
        host.close()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", list(LAYOUTS))
@pytest.mark.parametrize("arrangement", ["layer_first", "page_first"])
@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
@pytest.mark.parametrize("layer", [None, 0, -1], ids=["all", "first", "last"])
def test_path_equals_reference(pools, name, key, arrangement, to_host, layer):
    host, devs = pools[key]
    dev, dev_layout = devs[arrangement]
    layout = LAYOUTS[key]
    layer = None if layer is None else layer % layout.num_layers
    gen = torch.Generator().manual_seed(zlib.crc32(repr((name, key, arrangement, to_host, layer)).encode()))
    fill_random(dev, 11)
    fill_random(host.tensor, 12)
    dev_pages = with_run(torch.randperm(40, generator=gen), range(30, 34))[:17]
    host_pages = with_run(torch.randperm(24, generator=gen), range(8, 12))[:17]
    backend = copy_backend_for("cuda", name)
    if to_host:
        check_copy(backend, dev, dev_layout, dev_pages, host.tensor, host.layout, host_pages, layer)
    else:
        check_copy(backend, host.tensor, host.layout, host_pages, dev, dev_layout, dev_pages, layer)


@pytest.mark.parametrize("name", NAMES)
def test_empty_and_full_index_lists(pools, name):
    host, devs = pools["mha"]
    dev, dev_layout = devs["layer_first"]
    backend = copy_backend_for("cuda", name)
    fill_random(dev, 1)
    fill_random(host.tensor, 2)
    check_copy(backend, dev, dev_layout, [], host.tensor, host.layout, [], None)
    perm = torch.randperm(24)
    check_copy(backend, dev, dev_layout, torch.randperm(40)[:24], host.tensor, host.layout, perm, None)
    check_copy(backend, host.tensor, host.layout, perm, dev, dev_layout, torch.randperm(40)[:24], None)


@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
def test_staged_path_in_many_pieces(to_host):
    """A staging buffer of 3 pages: 7 pieces alternate between the two buffers."""
    from kvstore.copy_cuda import CudaCopyBackend

    layout = KVLayout(4, 2, 64, 16)
    backend = CudaCopyBackend(CudaPathPolicy(path="staged", staging_bytes=3 * layout.page_bytes))
    with HostPool(layout, num_slots=64) as host:
        dev = torch.empty(layout.pool_shape(64), dtype=layout.torch_dtype, device="cuda")
        for _ in range(3):
            fill_random(dev, 5)
            fill_random(host.tensor, 6)
            a, b = torch.randperm(64)[:20], torch.randperm(64)[:20]
            if to_host:
                check_copy(backend, dev, layout, a, host.tensor, host.layout, b, None)
            else:
                check_copy(backend, host.tensor, host.layout, a, dev, layout, b, None)


@pytest.mark.parametrize("name", NAMES)
def test_large_copy_with_torch_pinned_host_on_a_side_stream(name):
    """4096 chunks each way, host memory from torch's pinned allocator, a caller stream."""
    layout = KVLayout(32, 8, 128, 16)
    n = 64
    dev = torch.empty(layout.pool_shape(2 * n), dtype=layout.torch_dtype, device="cuda")
    host_layout = layout.with_arrangement("page_first")
    host = torch.empty(host_layout.pool_shape(n), dtype=layout.torch_dtype).pin_memory()
    fill_random(dev, 7)
    fill_random(host, 8)
    stream = torch.cuda.Stream()
    backend = copy_backend_for("cuda", name)
    check_copy(backend, dev, layout, torch.randperm(2 * n)[:n], host, host_layout, torch.randperm(n), None, stream)
    check_copy(backend, host, host_layout, torch.randperm(n), dev, layout, torch.randperm(2 * n)[:n], 5, stream)


def test_auto_selects_staged_for_chunk_runs_and_dma_for_page_runs():
    from kvstore.copy_cuda import CudaCopyBackend

    backend = CudaCopyBackend()
    layout = KVLayout(8, 2, 128, 64)  # 32 KiB chunks, 512 KiB pages
    with HostPool(layout, num_slots=40) as host:
        for arr, pages, path in (("layer_first", 40, "staged"), ("layer_first", 3, "dma"), ("page_first", 40, "dma")):
            lay = layout.with_arrangement(arr)
            dev = torch.zeros(lay.pool_shape(40), dtype=lay.torch_dtype, device="cuda")
            backend.copy_pages(dev, lay, range(pages), host.tensor, host.layout, range(pages))
            assert backend.last_path == path


@pytest.mark.parametrize("name", NAMES)
def test_pageable_host_memory_is_refused(name):
    layout = KVLayout(2, 2, 8, 4)
    dev = torch.zeros(layout.pool_shape(4), dtype=layout.torch_dtype, device="cuda")
    with HostPool(layout, num_slots=4, pin=False) as host:
        with pytest.raises(CopyArgumentError, match="pageable"):
            copy_backend_for("cuda", name).copy_pages(dev, layout, [0], host.tensor, host.layout, [1])


def test_stream_of_another_device_type_is_refused():
    layout = KVLayout(2, 2, 8, 4)
    dev = torch.zeros(layout.pool_shape(4), dtype=layout.torch_dtype, device="cuda")
    with HostPool(layout, num_slots=4) as host:
        with pytest.raises(CopyArgumentError, match="stream"):
            copy_backend_for("cuda", "cuda_sm").copy_pages(dev, layout, [0], host.tensor, host.layout, [1], stream=7)


@pytest.mark.parametrize("submit", ["batch", "batch_overlap", "per_run"])
@pytest.mark.parametrize("num_streams", [1, 3])
@pytest.mark.parametrize("path", ["dma", "staged"])
@pytest.mark.parametrize("on_default_stream", [True, False], ids=["default_stream", "own_stream"])
def test_dma_submission_variants(pools, submit, num_streams, path, on_default_stream):
    from kvstore.copy_cuda import CudaCopyBackend

    host, devs = pools["mha"]
    dev, dev_layout = devs["layer_first"]
    backend = CudaCopyBackend(CudaPathPolicy(path=path, dma_submit=submit, dma_streams=num_streams,
                                             staging_bytes=5 * dev_layout.page_bytes))
    stream = None if on_default_stream else torch.cuda.Stream()
    fill_random(dev, 3)
    fill_random(host.tensor, 4)
    a, b = torch.randperm(40)[:20], torch.randperm(24)[:20]
    check_copy(backend, dev, dev_layout, a, host.tensor, host.layout, b, None, stream)
    check_copy(backend, host.tensor, host.layout, b, dev, dev_layout, a, 2, stream)


@pytest.mark.parametrize("pages_per_launch", [1, 3])
def test_sm_path_in_several_launches(pools, pages_per_launch):
    from kvstore.copy_cuda import CudaCopyBackend

    host, devs = pools["mla"]
    dev, dev_layout = devs["layer_first"]
    launch_bytes = pages_per_launch * dev_layout.page_bytes
    backend = CudaCopyBackend(CudaPathPolicy(path="sm", sm_launch_bytes=launch_bytes, sm_blocks=2))
    fill_random(dev, 8)
    fill_random(host.tensor, 9)
    a, b = torch.randperm(40)[:10], torch.randperm(24)[:10]
    check_copy(backend, dev, dev_layout, a, host.tensor, host.layout, b, None)
    check_copy(backend, host.tensor, host.layout, b, dev, dev_layout, a, 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
def test_a_layer_first_pinned_host_pool_is_copied_exactly(name, to_host):
    """The contract lets the host pool use either arrangement; large copies of small pieces
    (the staged path's case) must still touch only the named pages."""
    from kvstore.copy_cuda import CudaCopyBackend

    layout = KVLayout(4, 2, 64, 16)
    host = torch.empty(layout.pool_shape(96), dtype=layout.torch_dtype).pin_memory()
    dev = torch.empty(layout.pool_shape(96), dtype=layout.torch_dtype, device="cuda")
    fill_random(host, 7)
    fill_random(dev, 8)
    backend = copy_backend_for("cuda", name) if name != "cuda_staged" else CudaCopyBackend(
        CudaPathPolicy(path="staged", staging_bytes=3 * layout.page_bytes))
    a, b = torch.randperm(96)[:80], torch.randperm(96)[:80]
    if to_host:
        check_copy(backend, dev, layout, a, host, layout, b, None)
    else:
        check_copy(backend, host, layout, a, dev, layout, b, None)


def test_staged_copy_on_a_side_stream_equals_reference():
    """The staging buffers are used on the copy's stream, not the current one."""
    from kvstore.copy_cuda import CudaCopyBackend

    layout = KVLayout(4, 2, 64, 16)
    backend = CudaCopyBackend(CudaPathPolicy(path="staged", staging_bytes=2 * layout.page_bytes))
    with HostPool(layout, num_slots=32) as host:
        dev = torch.empty(layout.pool_shape(32), dtype=layout.torch_dtype, device="cuda")
        fill_random(dev, 9)
        fill_random(host.tensor, 10)
        busy = torch.randn(4096, 4096, device="cuda")
        busy @ busy  # keep the current stream busy while the copy runs elsewhere
        stream = torch.cuda.Stream()
        check_copy(backend, dev, layout, torch.randperm(32)[:12], host.tensor, host.layout,
                   torch.randperm(32)[:12], None, stream=stream)


# ---- planned per-layer copies (plan_layers) ---------------------------------------------------
PLAN_POLICIES = {
    "auto": CudaPathPolicy(),
    "sm": CudaPathPolicy(plan_path="sm", plan_sm_blocks=3),
    "dma": CudaPathPolicy(plan_path="dma"),
    "dma_2streams": CudaPathPolicy(plan_path="dma", dma_streams=2),
    "loop_staged": CudaPathPolicy(path="staged", staging_bytes=3 * LAYOUTS["mha"].page_bytes),
}


def check_plan(backend, src, src_layout, src_pages, dst, dst_layout, dst_pages, order, stream=None):
    """Layers launched in ``order`` (None: launch_all) against the CPU reference of the whole copy."""
    want = dst.cpu().clone()
    REFERENCE.copy_pages(src.cpu(), src_layout, src_pages, want, dst_layout, dst_pages)
    plan = backend.plan_layers(src, src_layout, src_pages, dst, dst_layout, dst_pages)
    if order is None:
        plan.launch_all(stream)
    else:
        for layer in order:
            plan.launch(layer, stream)
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(dst), as_bytes(want))


@pytest.mark.parametrize("policy", list(PLAN_POLICIES))
@pytest.mark.parametrize("key", list(LAYOUTS))
@pytest.mark.parametrize("arrangement", ["layer_first", "page_first"])
@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
@pytest.mark.parametrize("all_at_once", [False, True], ids=["per_layer", "launch_all"])
def test_layer_plan_equals_reference(pools, policy, key, arrangement, to_host, all_at_once):
    from kvstore.copy_cuda import CudaCopyBackend

    host, devs = pools[key]
    dev, dev_layout = devs[arrangement]
    layout = LAYOUTS[key]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((policy, key, arrangement, to_host)).encode()))
    fill_random(dev, 21)
    fill_random(host.tensor, 22)
    dev_pages = with_run(torch.randperm(40, generator=gen), range(30, 34))[:17]
    host_pages = with_run(torch.randperm(24, generator=gen), range(8, 12))[:17]
    order = None if all_at_once else torch.randperm(layout.num_layers, generator=gen).tolist()
    backend = CudaCopyBackend(PLAN_POLICIES[policy])
    stream = torch.cuda.Stream()
    if to_host:
        check_plan(backend, dev, dev_layout, dev_pages, host.tensor, host.layout, host_pages, order, stream)
    else:
        check_plan(backend, host.tensor, host.layout, host_pages, dev, dev_layout, dev_pages, order, stream)


@pytest.mark.parametrize("name", NAMES)
def test_layer_plan_of_every_backend_name_and_large_pages(name):
    """Llama-3-8B shapes (32 KiB chunks), all pages of the pool, on the current stream."""
    layout = KVLayout(32, 8, 128, 16)
    n = 48
    dev = torch.empty(layout.pool_shape(2 * n), dtype=layout.torch_dtype, device="cuda")
    with HostPool(layout, num_slots=n) as host:
        fill_random(dev, 31)
        fill_random(host.tensor, 32)
        backend = copy_backend_for("cuda", name)
        pages, slots = torch.randperm(2 * n)[:n], torch.randperm(n)
        check_plan(backend, host.tensor, host.layout, slots, dev, layout, pages, list(range(32)))
        fill_random(dev, 33)
        check_plan(backend, dev, layout, pages, host.tensor, host.layout, slots, None)


def test_layer_plan_refuses_pageable_host_memory_and_bad_layers():
    layout = KVLayout(2, 2, 8, 4)
    dev = torch.zeros(layout.pool_shape(4), dtype=layout.torch_dtype, device="cuda")
    backend = copy_backend_for("cuda")
    with HostPool(layout, num_slots=4, pin=False) as host:
        with pytest.raises(CopyArgumentError, match="pageable"):
            backend.plan_layers(dev, layout, [0], host.tensor, host.layout, [1])
    with HostPool(layout, num_slots=4) as host:
        plan = backend.plan_layers(dev, layout, [0], host.tensor, host.layout, [1])
        with pytest.raises(ValueError, match="layer must be"):
            plan.launch(2)
        with pytest.raises(CopyArgumentError, match="stream"):
            plan.launch(0, stream=7)
