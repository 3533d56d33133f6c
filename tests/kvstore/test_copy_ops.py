"""The copy contract on CPU: the torch reference and the run-coalescing path (the NPU
path's planner and executor) against a naive per-chunk loop, the argument checks, run
coalescing, the CUDA path selector and backend choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.copy_ops import (
    CopyArgumentError,
    CudaPathPolicy,
    TorchCopyBackend,
    copy_backend_for,
    select_cuda_path,
)
from kvstore.copy_runs import RunCopyBackend, chunk_indices, coalesce, plan_runs
from kvstore.host_pool import HostPool
from kvstore.layout import KVLayout

BACKENDS = [TorchCopyBackend(), RunCopyBackend()]


# ---- factories ------------------------------------------------------------------
def random_pool(layout: KVLayout, num_pages: int, seed: int = 0) -> torch.Tensor:
    """A pool of random bytes (any bit pattern, NaNs included: compare as bytes)."""
    gen = torch.Generator().manual_seed(seed)
    numel = num_pages * layout.page_bytes
    raw = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen)
    return raw.view(layout.torch_dtype).view(layout.pool_shape(num_pages))


def naive_copy(src, src_layout, src_pages, dst, dst_layout, dst_pages, layer=None) -> None:
    """The semantics, one chunk at a time, straight from KVLayout.chunk_index."""
    src_n = src.shape[2 if src_layout.arrangement == "layer_first" else 0]
    dst_n = dst.shape[2 if dst_layout.arrangement == "layer_first" else 0]
    s = src.reshape(-1, src_layout.chunk_numel)
    d = dst.reshape(-1, dst_layout.chunk_numel)
    layers = range(src_layout.num_layers) if layer is None else [layer]
    for a, b in zip(src_pages, dst_pages):
        for l in layers:
            for k in range(src_layout.num_kv):
                d[dst_layout.chunk_index(l, k, b, dst_n)] = s[src_layout.chunk_index(l, k, a, src_n)]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def layouts(arrangement=st.sampled_from(["layer_first", "page_first"])):
    return st.builds(
        lambda L, H, D, P, dt, arr, mla: KVLayout(L, 1 if mla else H, D, P, dt, arr, mla),
        st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 3, 8]), st.integers(1, 4),
        st.sampled_from(["bfloat16", "float32", "uint8", "float8_e4m3fn"]), arrangement, st.booleans(),
    )


@st.composite
def copy_cases(draw):
    src_layout = draw(layouts())
    dst_layout = src_layout.with_arrangement(draw(st.sampled_from(["layer_first", "page_first"])))
    src_n, dst_n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n = draw(st.integers(0, min(src_n, dst_n)))
    dst_pages = draw(st.permutations(range(dst_n)))[:n]
    src_pages = draw(st.lists(st.integers(0, src_n - 1), min_size=n, max_size=n))
    layer = draw(st.one_of(st.none(), st.integers(0, src_layout.num_layers - 1)))
    return src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, layer


# ---- semantics --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@settings(max_examples=60, deadline=None)
@given(case=copy_cases(), as_tensor=st.booleans())
def test_backend_equals_naive_loop(backend, case, as_tensor):
    src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, layer = case
    src = random_pool(src_layout, src_n, seed=1)
    dst = random_pool(dst_layout, dst_n, seed=2)
    want = dst.clone()
    naive_copy(src, src_layout, src_pages, want, dst_layout, dst_pages, layer)
    idx = (lambda p: torch.tensor(p, dtype=torch.int32)) if as_tensor else list
    backend.copy_pages(src, src_layout, idx(src_pages), dst, dst_layout, idx(dst_pages), layer=layer)
    assert torch.equal(as_bytes(dst), as_bytes(want))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_host_pool_round_trip(backend):
    """Engine layer_first pool -> shm HostPool slots -> a fresh engine pool."""
    layout = KVLayout(3, 2, 8, 4)
    engine = random_pool(layout, 10, seed=3)
    with HostPool(layout, num_slots=6, pin=False) as host:
        slots = host.try_reserve(4)
        backend.copy_pages(engine, layout, [7, 2, 9, 0], host.tensor, host.layout, slots)
        back = torch.zeros_like(engine)
        backend.copy_pages(host.tensor, host.layout, slots, back, layout, [1, 3, 5, 8])
        for a, b in zip([7, 2, 9, 0], [1, 3, 5, 8]):
            assert torch.equal(as_bytes(back[:, :, b].contiguous()), as_bytes(engine[:, :, a].contiguous()))
        host.check_integrity()


# ---- argument checks ------------------------------------------------------------------
LAYOUT = KVLayout(2, 2, 4, 2)


def _args(**over):
    args = dict(src=random_pool(LAYOUT, 4), src_layout=LAYOUT, src_pages=[0, 1],
                dst=random_pool(LAYOUT.with_arrangement("page_first"), 3),
                dst_layout=LAYOUT.with_arrangement("page_first"), dst_pages=[2, 0], layer=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(dst_pages=[0]), "must match"),
        (dict(src_pages=[0, 4]), "src_pages holds pages"),
        (dict(dst_pages=[-1, 0]), "dst_pages holds pages"),
        (dict(dst_pages=[1, 1]), "repeats a page"),
        (dict(layer=2), "layer must be"),
        (dict(layer=-1), "layer must be"),
        (dict(src_pages=torch.zeros(2, 1, dtype=torch.int64)), "1-D"),
        (dict(src_pages=torch.zeros(2)), "1-D int32/int64"),
        (dict(src=random_pool(LAYOUT, 4).float()), "dtype"),
        (dict(src=random_pool(LAYOUT, 4)[:, :1]), "shape"),
        (dict(dst_layout=KVLayout(2, 2, 4, 4, arrangement="page_first")), "differ beyond arrangement"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_bad_arguments_are_refused_before_anything_moves(backend, over, message):
    args = _args(**over)
    before = args["dst"].clone()
    with pytest.raises(CopyArgumentError, match=message):
        backend.copy_pages(**args)
    assert torch.equal(as_bytes(args["dst"]), as_bytes(before))


def test_non_contiguous_pool_is_refused():
    pool = random_pool(LAYOUT, 8)[:, :, ::2]
    with pytest.raises(CopyArgumentError, match="contiguous"):
        TorchCopyBackend().copy_pages(pool, LAYOUT, [0], random_pool(LAYOUT, 2), LAYOUT, [0])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_empty_index_lists_change_nothing(backend):
    args = _args(src_pages=[], dst_pages=torch.empty(0, dtype=torch.int64))
    before = args["dst"].clone()
    backend.copy_pages(**args)
    assert torch.equal(as_bytes(args["dst"]), as_bytes(before))


# ---- run coalescing -----------------------------------------------------------------------
def test_page_first_pools_move_consecutive_pages_as_one_run():
    layout = KVLayout(4, 2, 8, 16, arrangement="page_first")
    runs = coalesce(
        chunk_indices(layout, 10, torch.tensor([3, 4, 5, 9]), range(4)),
        chunk_indices(layout, 10, torch.tensor([0, 1, 2, 6]), range(4)),
        layout.chunk_bytes,
    )
    assert runs.sizes.tolist() == [3 * layout.page_bytes, layout.page_bytes]
    assert runs.src_offsets.tolist() == [3 * layout.page_bytes, 9 * layout.page_bytes]
    assert runs.dst_offsets.tolist() == [0, 6 * layout.page_bytes]


def test_one_layer_of_page_first_pools_is_one_run_per_page():
    layout = KVLayout(4, 2, 8, 16, arrangement="page_first")
    runs = coalesce(
        chunk_indices(layout, 10, torch.tensor([3, 4]), range(2, 3)),
        chunk_indices(layout, 10, torch.tensor([0, 1]), range(2, 3)),
        layout.chunk_bytes,
    )
    assert runs.sizes.tolist() == [layout.page_layer_bytes] * 2  # K and V of a layer are adjacent


def test_layer_first_to_page_first_is_one_run_per_chunk():
    dev = KVLayout(4, 2, 8, 16)
    host = dev.with_arrangement("page_first")
    from kvstore.copy_ops import plan_copy

    plan = plan_copy(random_pool(dev, 6), dev, [0, 1, 2], random_pool(host, 6), host, [0, 1, 2], None)
    runs = plan_runs(dev, host, plan)
    assert runs.num_runs == 3 * 4 * 2 and runs.mean_run_bytes == dev.chunk_bytes


def test_layer_first_pools_coalesce_consecutive_pages_per_layer():
    dev = KVLayout(2, 2, 8, 16)
    runs = coalesce(
        chunk_indices(dev, 8, torch.tensor([4, 5, 6]), range(2)),
        chunk_indices(dev, 8, torch.tensor([1, 2, 3]), range(2)),
        dev.chunk_bytes,
    )
    assert runs.num_runs == 4 and set(runs.sizes.tolist()) == {3 * dev.chunk_bytes}


@settings(max_examples=40, deadline=None)
@given(case=copy_cases())
def test_runs_cover_each_destination_byte_once(case):
    src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, layer = case
    from kvstore.copy_ops import plan_copy

    plan = plan_copy(random_pool(src_layout, src_n), src_layout, src_pages,
                     random_pool(dst_layout, dst_n), dst_layout, dst_pages, layer)
    runs = plan_runs(src_layout, dst_layout, plan)
    expected = len(dst_pages) * len(plan.layers) * src_layout.num_kv * src_layout.chunk_bytes
    assert runs.total_bytes == expected
    ends = runs.dst_offsets + runs.sizes
    assert bool((runs.dst_offsets[1:] >= ends[:-1]).all())  # sorted, disjoint


# ---- selector and backend choice ---------------------------------------------------------------
def test_page_span_bytes():
    from kvstore.copy_runs import page_span_bytes

    dev = KVLayout(32, 8, 128, 16)  # 32 KiB chunks
    host = dev.with_arrangement("page_first")
    assert page_span_bytes(dev, host, range(32)) == 32 * 1024
    assert page_span_bytes(host, host, range(32)) == 2 << 20
    assert page_span_bytes(host, host, range(3, 4)) == 64 * 1024
    mla = KVLayout(4, 1, 576, 64, is_mla=True)
    assert page_span_bytes(mla, mla.with_arrangement("page_first"), range(1, 2)) == mla.chunk_bytes


def test_selector_rules():
    auto = CudaPathPolicy()
    big, small = 256 << 20, 8 << 20
    assert select_cuda_path(auto, 32 * 1024, big) == "staged"  # 16-token chunks, all layers
    assert select_cuda_path(auto, 32 * 1024, small) == "dma"  # one layer: staging doesn't pay
    assert select_cuda_path(auto, auto.dma_min_run_bytes, big) == "dma"  # 64-token chunks
    assert select_cuda_path(CudaPathPolicy(path="sm"), 10**9, big) == "sm"
    with pytest.raises(ValueError, match="path"):
        CudaPathPolicy(path="fast")
    with pytest.raises(ValueError, match="sm_threads"):
        CudaPathPolicy(sm_threads=100)


def test_backend_choice():
    assert copy_backend_for("cpu").name == "torch"
    assert copy_backend_for("cpu", "runs").name == "runs"
    with pytest.raises(ValueError, match="unknown copy backend"):
        copy_backend_for("cpu", "warp")
    with pytest.raises(ValueError, match="runs on cuda"):
        copy_backend_for("cpu", "cuda_sm")
    with pytest.raises(ValueError, match="runs on npu"):
        copy_backend_for("cpu", "npu")


def test_importing_the_ops_packages_builds_and_loads_nothing():
    import subprocess
    import sys

    code = (
        "import sys, cuda_ops, cuda_ops.build, npu_ops, kvstore.copy_ops;"
        "assert cuda_ops.build._lib is None, 'the CUDA library was built or loaded on import';"
        "assert npu_ops._acl is None, 'the ACL runtime was loaded on import';"
        "assert 'torch_npu' not in sys.modules, 'torch_npu was imported';"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_staged_page_runs_merge_consecutive_host_slots():
    import numpy as np

    from kvstore.copy_cuda import _page_runs

    page = 1000
    host = np.array([5, 6, 7, 2, 9, 10]) * page + 10**6
    stage, dst, sizes = _page_runs(host, 500, page)
    assert stage.tolist() == [500, 500 + 3 * page, 500 + 4 * page]
    assert dst.tolist() == [10**6 + 5 * page, 10**6 + 2 * page, 10**6 + 9 * page]
    assert sizes.tolist() == [3 * page, page, 2 * page]


# ---- planned per-layer copies (plan_layers) ---------------------------------------------------
@st.composite
def layer_plan_cases(draw):
    src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, _ = draw(copy_cases())
    order = draw(st.permutations(range(src_layout.num_layers)))
    return src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, order


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@settings(max_examples=60, deadline=None)
@given(case=layer_plan_cases(), as_tensor=st.booleans(), all_at_once=st.booleans())
def test_layer_plan_equals_naive_loop(backend, case, as_tensor, all_at_once):
    """Launching every layer (in any order) or launch_all equals the whole copy."""
    src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, order = case
    src = random_pool(src_layout, src_n, seed=1)
    dst = random_pool(dst_layout, dst_n, seed=2)
    want = dst.clone()
    naive_copy(src, src_layout, src_pages, want, dst_layout, dst_pages)
    idx = (lambda p: torch.tensor(p, dtype=torch.int64)) if as_tensor else list
    plan = backend.plan_layers(src, src_layout, idx(src_pages), dst, dst_layout, idx(dst_pages))
    assert (plan.num_layers, plan.num_pages) == (src_layout.num_layers, len(src_pages))
    if all_at_once:
        plan.launch_all()
    else:
        for layer in order:
            plan.launch(layer)
    assert torch.equal(as_bytes(dst), as_bytes(want))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_one_launch_moves_exactly_one_layer(backend):
    src_layout = KVLayout(4, 2, 8, 4)
    dst_layout = src_layout.with_arrangement("page_first")
    src, dst = random_pool(src_layout, 6, seed=3), random_pool(dst_layout, 5, seed=4)
    want = dst.clone()
    naive_copy(src, src_layout, [5, 0, 3], want, dst_layout, [1, 4, 2], layer=2)
    backend.plan_layers(src, src_layout, [5, 0, 3], dst, dst_layout, [1, 4, 2]).launch(2)
    assert torch.equal(as_bytes(dst), as_bytes(want))


@pytest.mark.parametrize("over, message", [
    (dict(dst_pages=[0]), "must match"),
    (dict(src_pages=[0, 4]), "src_pages holds pages"),
    (dict(dst_pages=[1, 1]), "repeats a page"),
    (dict(dst_layout=KVLayout(2, 2, 4, 4, arrangement="page_first")), "differ beyond arrangement"),
])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_layer_plan_checks_everything_up_front(backend, over, message):
    args = _args(**over)
    del args["layer"]
    with pytest.raises(CopyArgumentError, match=message):
        backend.plan_layers(**args)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_layer_plan_refuses_a_layer_outside_the_pool(backend):
    args = _args()
    del args["layer"]
    plan = backend.plan_layers(**args)
    before = args["dst"].clone()
    for bad in (-1, 2, None, True):
        with pytest.raises(ValueError, match="layer must be"):
            plan.launch(bad)
    assert torch.equal(as_bytes(args["dst"]), as_bytes(before))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_empty_layer_plan_moves_nothing(backend):
    args = _args(src_pages=[], dst_pages=[])
    del args["layer"]
    before = args["dst"].clone()
    plan = backend.plan_layers(**args)
    plan.launch(1)
    plan.launch_all()
    assert plan.num_pages == 0 and torch.equal(as_bytes(args["dst"]), as_bytes(before))


@settings(max_examples=40, deadline=None)
@given(case=copy_cases())
def test_layer_runs_are_layer_zero_runs_shifted(case):
    """The one-coalesce shortcut of planned copies equals coalescing each layer afresh."""
    from kvstore.copy_ops import CopyPlan, plan_copy
    from kvstore.copy_runs import layer_runs

    src_layout, src_n, src_pages, dst_layout, dst_n, dst_pages, _ = case
    plan = plan_copy(random_pool(src_layout, src_n), src_layout, src_pages,
                     random_pool(dst_layout, dst_n), dst_layout, dst_pages, None)
    runs, src_step, dst_step = layer_runs(src_layout, dst_layout, plan)
    for layer in range(src_layout.num_layers):
        one = CopyPlan(plan.src_pages, plan.dst_pages, src_n, dst_n, range(layer, layer + 1))
        fresh = plan_runs(src_layout, dst_layout, one)
        assert fresh.src_offsets.tolist() == (runs.src_offsets + layer * src_step).tolist()
        assert fresh.dst_offsets.tolist() == (runs.dst_offsets + layer * dst_step).tolist()
        assert fresh.sizes.tolist() == runs.sizes.tolist()


def test_plan_path_selector():
    from kvstore.copy_ops import select_plan_path

    auto = CudaPathPolicy()
    assert select_plan_path(auto, 32 * 1024) == "sm"  # 16-token chunks: too many runs per layer
    assert select_plan_path(auto, auto.dma_min_run_bytes) == "dma"
    assert select_plan_path(CudaPathPolicy(path="staged"), 32 * 1024) == "loop"
    assert select_plan_path(CudaPathPolicy(path="dma"), 32 * 1024) == "dma"
    assert select_plan_path(CudaPathPolicy(path="dma", plan_path="sm"), 10**9) == "sm"
    with pytest.raises(ValueError, match="plan_path"):
        CudaPathPolicy(plan_path="fast")
    with pytest.raises(ValueError, match="plan_sm_blocks"):
        CudaPathPolicy(plan_sm_blocks=0)
