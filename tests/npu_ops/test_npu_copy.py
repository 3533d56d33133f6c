"""The NPU path on a real Ascend NPU (skipped without torch_npu). Its planning and run
executor are tested on CPU in tests/kvstore/test_copy_ops.py (RunCopyBackend)."""

from __future__ import annotations

import pytest
import torch

import npu_ops
from kvstore.copy_ops import TorchCopyBackend, copy_backend_for
from kvstore.host_pool import HostPool
from kvstore.layout import KVLayout

pytestmark = [
    pytest.mark.npu,
    pytest.mark.skipif(not npu_ops.is_available(), reason="needs torch_npu and an Ascend NPU"),
]


def fill_random(t: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    flat = t.reshape(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, (flat.numel(),), dtype=torch.uint8, generator=gen).to(t.device))


@pytest.mark.parametrize("arrangement", ["layer_first", "page_first"])
@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
@pytest.mark.parametrize("layer", [None, 1])
def test_npu_path_equals_reference(arrangement, to_host, layer):
    layout = KVLayout(4, 2, 64, 16, arrangement=arrangement)
    backend = copy_backend_for("npu")
    with HostPool(layout, num_slots=16, pin=False) as host:
        dev = torch.empty(layout.pool_shape(32), dtype=layout.torch_dtype, device="npu")
        fill_random(dev, 1)
        fill_random(host.tensor, 2)
        dev_pages, host_pages = torch.randperm(32)[:12], torch.randperm(16)[:12]
        stream = torch.npu.Stream()
        if to_host:
            want = host.tensor.clone()
            TorchCopyBackend().copy_pages(dev.cpu(), layout, dev_pages, want, host.layout, host_pages, layer=layer)
            backend.copy_pages(dev, layout, dev_pages, host.tensor, host.layout, host_pages, layer=layer, stream=stream)
            stream.synchronize()
            got = host.tensor
        else:
            want = dev.cpu()
            TorchCopyBackend().copy_pages(host.tensor, host.layout, host_pages, want, layout, dev_pages, layer=layer)
            backend.copy_pages(host.tensor, host.layout, host_pages, dev, layout, dev_pages, layer=layer, stream=stream)
            stream.synchronize()
            got = dev.cpu()
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        npu_ops.unregister_host_memory(host.tensor.data_ptr())
