"""The device side of the pipelines: stores that complete behind the call (published only
once their copy is done), planned layer-wise loads, and -- on CUDA -- the background
issuer, the write stream's ordering and release during a load."""

from __future__ import annotations

import pytest
import torch

from controller.api import CacheError
from controller.config import ControllerConfig, L3Config
from controller.device_pool import DevicePool, SaveCopy
from controller.embedded import EmbeddedController
from controller.load_handle import CudaStreamLoad, LayerIssuer
from kvstore.host_pool import HostPool
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("pipeline-test-model", LAYOUT)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_controller(tmp_path, device="cpu", host_pages=8, l3=None):
    pool = torch.zeros(LAYOUT.pool_shape(32), device=device)
    options = {"path": str(tmp_path / "l3"), "capacity_bytes": 64 << 20} if l3 == "disk" else {}
    config = ControllerConfig(host_pool_pages=host_pages,
                              l3=L3Config(connector=l3, options=options, write_policy="write_back"))
    return EmbeddedController(config, NAMESPACE, pool), pool


def fill_pages(pool, pages, seed):
    gen = torch.Generator().manual_seed(seed)
    for page in pages:
        pool[:, :, page] = torch.randn(pool[:, :, page].shape, generator=gen).to(pool.device)


class DeferredCopy(SaveCopy):
    """A copy the test completes by hand (moving the bytes then), or fails."""

    def __init__(self, do_copy) -> None:
        super().__init__(None)
        self._do_copy, self.is_complete, self.error = do_copy, False, None

    def complete(self) -> None:
        self._do_copy()
        self.is_complete = True

    def is_done(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.is_complete

    def wait(self) -> None:
        if not self.is_complete:
            self.complete()


def defer_saves(ctl) -> list[DeferredCopy]:
    """Make the controller's device pool's saves complete only when the test says so."""
    device, copies = ctl._device, []
    real = device.start_save

    def start_save(pages, host, slots):
        copies.append(DeferredCopy(lambda: real(pages, host, slots)))
        return copies[-1]

    device.start_save = start_save
    return copies


# ---- stores behind the call (CPU, with a deferred copy) ---------------------------------------
def test_a_store_is_visible_only_once_its_copy_has_completed(tmp_path):
    ctl, pool = make_controller(tmp_path)
    copies = defer_saves(ctl)
    tokens = list(range(12))
    fill_pages(pool, range(3), seed=1)
    stored = ctl.store(tokens, [0, 1, 2])
    assert (stored.num_pages, stored.num_new_pages) == (3, 3)
    assert ctl.num_pending_stores == 1

    other = ctl.lookup(list(range(50, 62)))  # copy in flight and not needed: nothing published
    assert other.num_hit_pages == 0 and ctl.num_pending_stores == 1
    assert ctl.stats().num_stored_pages == 0
    ctl.release(other)
    ctl.check_integrity()

    copies[0].complete()
    hit = ctl.lookup(tokens)  # the lookup publishes the completed store first
    assert hit.num_hit_pages == 3 and ctl.num_pending_stores == 0
    ctl.load(hit, [10, 11, 12]).wait_all()
    ctl.release(hit)
    assert all(torch.equal(pool[:, :, a], pool[:, :, b]) for a, b in zip([0, 1, 2], [10, 11, 12]))
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_stores_are_published_in_order_up_to_the_first_in_flight(tmp_path):
    ctl, pool = make_controller(tmp_path)
    copies = defer_saves(ctl)
    ctl.store(list(range(8)), [0, 1])
    ctl.store(list(range(100, 108)), [2, 3])
    copies[1].complete()  # the later one is done, the earlier one is not
    assert ctl.stats().num_stored_pages == 0 and ctl.num_pending_stores == 2
    copies[0].complete()
    assert ctl.stats().num_stored_pages == 4 and ctl.num_pending_stores == 0
    ctl.close()


def test_a_lookup_waits_for_the_stores_holding_its_pages(tmp_path):
    """A miss would cost a recompute; the copy is already under way, so the lookup waits."""
    ctl, pool = make_controller(tmp_path)
    copies = defer_saves(ctl)
    ctl.store(list(range(8)), [0, 1])
    ctl.store(list(range(100, 108)), [2, 3])
    ctl.store(list(range(200, 208)), [4, 5])
    hit = ctl.lookup(list(range(100, 112)))
    assert hit.num_hit_pages == 2
    assert [c.is_complete for c in copies] == [True, True, False]  # up to the one it needs
    assert ctl.num_pending_stores == 1
    ctl.release(hit)
    ctl.close()


def test_close_waits_for_stores_in_flight_and_flushes_them_to_l3(tmp_path):
    ctl, pool = make_controller(tmp_path, l3="disk")
    copies = defer_saves(ctl)
    fill_pages(pool, range(4), seed=2)
    ctl.store(list(range(16)), [0, 1, 2, 3])
    report = ctl.close()
    assert copies[0].is_complete and report.num_written == 4

    reader, back = make_controller(tmp_path, l3="disk")
    result = reader.lookup(list(range(16)))
    assert result.num_l3_pages == 4
    reader.load(result, [20, 21, 22, 23]).wait_all()
    assert all(torch.equal(back[:, :, 20 + i], pool[:, :, i]) for i in range(4))
    reader.close()


def test_a_failed_copy_gives_its_slots_back(tmp_path):
    ctl, _ = make_controller(tmp_path, host_pages=4)
    copies = defer_saves(ctl)
    ctl.store(list(range(16)), [0, 1, 2, 3])
    copies[0].error = RuntimeError("CUDA error: an illegal memory access")
    with pytest.raises(RuntimeError, match="illegal"):
        ctl.stats()
    ctl.check_integrity(quiescent=True)  # no slot is left reserved
    assert ctl.stats().num_stored_pages == 0
    assert ctl.store(list(range(16)), [0, 1, 2, 3]).num_new_pages == 4  # the pool is whole again
    ctl.close()


def test_a_store_of_pages_already_in_flight_publishes_once(tmp_path):
    ctl, pool = make_controller(tmp_path)
    copies = defer_saves(ctl)
    ctl.store(list(range(8)), [0, 1])
    ctl.store(list(range(8)), [4, 5])  # same tokens again before the first copy completed
    for copy in copies:
        copy.complete()
    assert ctl.stats().num_stored_pages == 2
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_cpu_stores_are_synchronous(tmp_path):
    ctl, pool = make_controller(tmp_path)
    ctl.store(list(range(8)), [0, 1])
    assert ctl.num_pending_stores == 0 and ctl.stats().num_stored_pages == 2
    ctl.close()


def test_a_bad_load_is_refused_at_the_call(tmp_path):
    """Checks run when the load is planned, not when a layer is first waited on."""
    ctl, pool = make_controller(tmp_path)
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup(list(range(8)))
    with pytest.raises(CacheError, match="outside the engine pool"):
        ctl.load(result, [0, 99])
    ctl.release(result)
    ctl.close()


# ---- CUDA ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_cuda_store_then_load_round_trip(tmp_path):
    ctl, pool = make_controller(tmp_path, device="cuda")
    fill_pages(pool, range(4), seed=3)
    ctl.store(list(range(16)), [0, 1, 2, 3])
    ctl.check_integrity(quiescent=True)  # waits for the copy and publishes it
    result = ctl.lookup(list(range(16)))
    assert result.num_hit_pages == 4
    handle = ctl.load(result, [8, 9, 10, 11])
    for layer in range(LAYOUT.num_layers):
        handle.wait_layer(layer)
    torch.cuda.current_stream().synchronize()
    assert all(torch.equal(pool[:, :, 8 + i], pool[:, :, i]) for i in range(4))
    ctl.release(result)
    ctl.close()


@pytest.mark.cuda
@cuda
def test_cuda_engine_may_overwrite_its_pages_right_after_store(tmp_path):
    """The engine's later kernels are ordered after the copy: the slots get the old bytes."""
    layout = KVLayout(8, 8, 128, 16, dtype="bfloat16")
    dev = torch.empty(layout.pool_shape(64), dtype=layout.torch_dtype, device="cuda")
    dev.normal_()
    want = dev[:, :, :48].cpu().clone()
    with HostPool(layout, num_slots=48) as host:
        pool = DevicePool(layout, dev, None)
        torch.cuda._sleep(50_000_000)  # keep the engine stream busy: the copy waits behind it
        copy = pool.start_save(list(range(48)), host, list(range(48)))
        dev.zero_()  # the engine reuses its pages at once
        copy.wait()
        torch.cuda.synchronize()
        got = host.tensor.permute(1, 2, 0, 3, 4, 5)  # page_first -> layer_first order
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        pool.close()


@pytest.mark.cuda
@cuda
def test_cuda_layer_load_waits_and_release_mid_load(tmp_path):
    layout = KVLayout(16, 8, 128, 16, dtype="bfloat16")
    dev = torch.zeros(layout.pool_shape(96), dtype=layout.torch_dtype, device="cuda")
    with HostPool(layout, num_slots=96) as host:
        host.tensor.copy_(torch.randn(host.tensor.shape).to(layout.torch_dtype))
        pool = DevicePool(layout, dev, None)
        pages, slots = torch.randperm(96).tolist(), torch.randperm(96).tolist()
        handle = pool.load(host, slots, pages)
        for layer in range(layout.num_layers):
            handle.wait_layer(layer)
            got = dev[layer, :, pages].cpu()  # on the current stream, after the wait
            assert torch.equal(got, host.tensor[slots, layer].transpose(0, 1))
        handle.finish()
        with pytest.raises(CacheError, match="released"):
            handle.wait_layer(0)
        early = pool.load(host, slots, pages)
        early.finish()  # released before any wait: returns once nothing reads the slots
        pool.close()


class _FailingPlan:
    num_layers, num_pages = 4, 1

    def launch(self, layer, stream=None):
        if layer == 2:
            raise RuntimeError("launch failed")


@pytest.mark.cuda
@cuda
def test_cuda_a_failed_launch_surfaces_at_the_wait():
    issuer = LayerIssuer(torch.device("cuda", torch.cuda.current_device()))
    handle = CudaStreamLoad(_FailingPlan(), torch.cuda.Stream(), issuer)
    handle.wait_layer(1)
    with pytest.raises(CacheError, match="launch failed"):
        handle.wait_layer(2)
    handle.finish()
    issuer.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
def test_a_slot_reused_during_a_load_is_a_load_error_naming_it(tmp_path, device):
    """The fence: a slot whose generation changes before the copy is over fails the load
    with LoadError for that page (CPU: at the wait that copied it; CUDA: at verify), and
    every page before it is loaded whole."""
    from controller.api import LoadError

    ctl, pool = make_controller(tmp_path, device)
    try:
        fill_pages(pool, range(4), seed=5)
        tokens = list(range(4 * LAYOUT.page_size))
        ctl.store(tokens, [0, 1, 2, 3])
        expected = pool[:, :, :4].clone()
        result = ctl.lookup(tokens)
        handle = ctl.load(result, [10, 11, 12, 13])
        slot = ctl._core.slots_of([result.keys[2]])[0]
        ctl._core.pool.generations[slot] += 1        # handed to another writer meanwhile
        with pytest.raises(LoadError) as caught:
            handle.wait_all()
            handle.verify()
        assert caught.value.bad_pages == (2,) and caught.value.first_bad_page == 2
        torch.testing.assert_close(pool[:, :, 10:12], expected[:, :, :2], rtol=0, atol=0)
        with pytest.raises(LoadError):
            handle.verify()                           # the verdict stands
        ctl.release(result)
    finally:
        ctl.close()
