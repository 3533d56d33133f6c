"""SGLang host-pool page views (no SGLang needed): every layout, MHA and MLA, agrees
with SGLang's own flat-page order and writes through to the engine's buffer."""

import pytest
import torch

from adapters.sglang.host_layout import flat_page_view, layout_of, page_view
from sglang_host_pools import FakeHostPool

CASES = [("layer_first", False), ("page_first", False), ("page_first_direct", False),
         ("page_head", False), ("layer_first", True), ("page_first", True),
         ("page_first_direct", True)]


@pytest.mark.parametrize("mem_layout,is_mla", CASES)
def test_page_view_matches_sglang_flat_pages(mem_layout, is_mla):
    pool = FakeHostPool(mem_layout, is_mla=is_mla)
    pool.fill_random(1)
    layout = layout_of(pool)
    view = page_view(pool.kv_buffer, mem_layout, layout)
    assert tuple(view.shape) == (pool.page_num, *layout.pool_shape(1)[1:])
    for page in range(pool.page_num):
        flat = pool.flat_in_sglang_order(page * pool.page_size)
        assert torch.equal(view[page], flat_page_view(flat, layout))


@pytest.mark.parametrize("mem_layout,is_mla", CASES)
def test_page_view_writes_through(mem_layout, is_mla):
    pool = FakeHostPool(mem_layout, is_mla=is_mla)
    layout = layout_of(pool)
    view = page_view(pool.kv_buffer, mem_layout, layout)
    view[2].fill_(7.0)
    assert int((pool.kv_buffer == 7.0).sum()) == view[2].numel()
    assert torch.all(pool.get_data_page(2 * pool.page_size) == 7.0)


def test_layout_of_names_mla_and_mha():
    assert layout_of(FakeHostPool("page_first", is_mla=True)).is_mla
    mha = layout_of(FakeHostPool("layer_first", head_num=2, head_dim=4))
    assert (mha.num_kv_heads, mha.head_dim, mha.arrangement) == (2, 4, "page_first")


def test_unsupported_layout_is_named():
    pool = FakeHostPool("page_first", is_mla=True)
    with pytest.raises(ValueError, match="page_head"):
        page_view(pool.kv_buffer, "page_head", layout_of(pool))
