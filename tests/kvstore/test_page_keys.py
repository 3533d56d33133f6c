import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvstore.layout import KVLayout
from kvstore.page_keys import KEY_BYTES, KeyNamespace, page_keys

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")
NS = KeyNamespace("test-model", LAYOUT).digest()
tokens_st = st.lists(st.integers(0, 2**31 - 1), max_size=64)


def test_only_full_pages_get_keys():
    assert len(page_keys(NS, list(range(11)), 4)) == 2
    assert page_keys(NS, [], 4) == []
    assert all(len(k) == KEY_BYTES for k in page_keys(NS, list(range(8)), 4))


@given(tokens_st, tokens_st)
def test_equal_prefixes_give_equal_keys(a, b):
    ka, kb = page_keys(NS, a, 4), page_keys(NS, b, 4)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == ((i + 1) * 4 <= common)


@given(st.lists(st.integers(0, 1000), min_size=8, max_size=64), st.data())
def test_a_changed_token_changes_its_page_and_every_later_one(tokens, data):
    pos = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[pos] += 1
    before, after = page_keys(NS, tokens, 4), page_keys(NS, changed, 4)
    first = pos // 4
    assert before[:first] == after[:first]
    assert all(x != y for x, y in zip(before[first:], after[first:]))


def test_continuing_a_chain_equals_hashing_at_once():
    tokens = list(range(40))
    whole = page_keys(NS, tokens, 4)
    head = page_keys(NS, tokens[:16], 4)
    assert head + page_keys(NS, tokens[16:], 4, prior_key=head[-1]) == whole


@pytest.mark.parametrize(
    "field", [dict(model_id="other"), dict(tp_rank=1, tp_size=2), dict(lora_id="a"),
              dict(cache_salt="tenant-2"), dict(layout=KVLayout(2, 2, 8, 4, "float16")),
              dict(pp_rank=1, pp_size=2)]
)
def test_every_namespace_field_separates_keys(field):
    base = KeyNamespace("test-model", LAYOUT)
    other = KeyNamespace(**{"model_id": "test-model", "layout": LAYOUT, **field})
    assert page_keys(base.digest(), range(8), 4) != page_keys(other.digest(), range(8), 4)


def test_pipeline_stages_have_keys_of_their_own_and_one_stage_keeps_the_old_digest():
    stage0, stage1 = (KeyNamespace("test-model", LAYOUT, pp_rank=r, pp_size=2) for r in (0, 1))
    assert len({stage0.digest(), stage1.digest(), KeyNamespace("test-model", LAYOUT).digest()}) == 3
    # A single stage names none: keys stored before the field existed still match
    # (the digest below was made by the code before it).
    single = KeyNamespace("test-model", LAYOUT, pp_rank=0, pp_size=1).digest()
    assert single.hex() == "8aa042bd3c1a09c9512e0a9183c93489"
    with pytest.raises(ValueError, match="pp_rank"):
        KeyNamespace("test-model", LAYOUT, pp_rank=2, pp_size=2)


def test_keys_are_the_same_in_another_process():
    code = (
        "from kvstore.layout import KVLayout; from kvstore.page_keys import KeyNamespace, page_keys;"
        "ns = KeyNamespace('test-model', KVLayout(2, 2, 8, 4, 'float32')).digest();"
        "print(page_keys(ns, list(range(100)), 4)[-1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == page_keys(NS, list(range(100)), 4)[-1].hex()


def test_numpy_and_list_tokens_agree_and_bad_tokens_are_refused():
    assert page_keys(NS, np.arange(16, dtype=np.int64), 4) == page_keys(NS, list(range(16)), 4)
    with pytest.raises(ValueError, match="range"):
        page_keys(NS, [1, -2, 3, 4], 4)
    with pytest.raises(ValueError, match="integers"):
        page_keys(NS, [1.5, 2.0], 4)
    with pytest.raises(ValueError, match="tp_rank"):
        KeyNamespace("m", LAYOUT, tp_rank=2, tp_size=2)
