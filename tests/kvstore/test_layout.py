import pytest
import torch
from hypothesis import given, strategies as st

from kvstore.layout import KVLayout, LayoutError


def make_layout(**overrides) -> KVLayout:
    fields = dict(num_layers=4, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")
    fields.update(overrides)
    return KVLayout(**fields)


def test_bytes_of_a_llama3_8b_page():
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16")
    assert layout.chunk_bytes == 16 * 8 * 128 * 2
    assert layout.page_layer_bytes == 2 * layout.chunk_bytes
    assert layout.page_bytes == 32 * 2 * 16 * 8 * 128 * 2 == 2 * 1024 * 1024


def test_mla_has_one_tensor_per_layer():
    layout = make_layout(is_mla=True, num_kv_heads=1, head_dim=576, dtype="bfloat16")
    assert layout.num_kv == 1
    assert layout.page_layer_bytes == layout.chunk_bytes
    assert layout.pool_shape(3) == (4, 1, 3, 4, 1, 576)


@pytest.mark.parametrize(
    "field,value",
    [("num_layers", 0), ("num_kv_heads", -1), ("head_dim", 1.5), ("page_size", True),
     ("dtype", "float64"), ("arrangement", "heads_first")],
)
def test_invalid_fields_are_named_in_the_error(field, value):
    with pytest.raises(LayoutError, match=field):
        make_layout(**{field: value})


def test_mla_with_several_heads_is_rejected():
    with pytest.raises(LayoutError, match="num_kv_heads"):
        make_layout(is_mla=True, num_kv_heads=2)


@given(
    layers=st.integers(1, 5), heads=st.integers(1, 3), pages=st.integers(1, 6),
    mla=st.booleans(), arrangement=st.sampled_from(["layer_first", "page_first"]),
)
def test_chunk_index_matches_the_tensor_layout(layers, heads, pages, mla, arrangement):
    layout = make_layout(num_layers=layers, num_kv_heads=1 if mla else heads, is_mla=mla,
                         arrangement=arrangement, page_size=2, head_dim=3)
    pool = torch.arange(layout.chunk_numel * layers * layout.num_kv * pages, dtype=torch.float32)
    pool = pool.view(layout.pool_shape(pages))
    strides = layout.chunk_strides(pages)
    flat = pool.view(-1, layout.chunk_numel)
    for layer in range(layers):
        for kv in range(layout.num_kv):
            for page in range(pages):
                index = layout.chunk_index(layer, kv, page, pages)
                assert index == layer * strides[0] + kv * strides[1] + page * strides[2]
                if arrangement == "layer_first":
                    chunk = pool[layer, kv, page]
                else:
                    chunk = pool[page, layer, kv]
                assert torch.equal(flat[index], chunk.reshape(-1))


def test_check_pool_reports_the_wrong_shape_and_dtype():
    layout = make_layout()
    assert layout.check_pool(torch.zeros(layout.pool_shape(5))) == 5
    with pytest.raises(LayoutError, match="dtype"):
        layout.check_pool(torch.zeros(layout.pool_shape(5), dtype=torch.float16))
    with pytest.raises(LayoutError, match="shape"):
        layout.check_pool(torch.zeros(4, 2, 5, 4, 2, 9))
    with pytest.raises(LayoutError, match="contiguous"):
        layout.check_pool(torch.zeros(layout.pool_shape(5)).transpose(0, 1).contiguous().transpose(0, 1))


def test_fingerprint_ignores_arrangement_only():
    layout = make_layout()
    assert layout.fingerprint() == layout.with_arrangement("page_first").fingerprint()
    assert layout.fingerprint() != make_layout(page_size=8).fingerprint()
