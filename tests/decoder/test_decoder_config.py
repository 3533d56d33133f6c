"""DecoderConfig: presets, validation messages, the KV layout it implies, model ids."""

import pytest

from decoder import PRESETS, DecoderConfig, DecoderConfigError
from kvstore.layout import KVLayout, LayoutError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_gqa(name):
    config = DecoderConfig.preset(name)
    assert config.num_heads % config.num_kv_heads == 0
    assert config.num_kv_heads < config.num_heads  # presets exercise GQA


def test_small_preset_is_the_demo_size():
    c = DecoderConfig.preset("small")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (512, 8, 8, 4, 64)
    assert (c.intermediate_size, c.vocab_size) == (1408, 8192)


def test_preset_overrides_and_unknown_names():
    assert DecoderConfig.preset("tiny", seed=7).seed == 7
    with pytest.raises(DecoderConfigError, match="unknown DecoderConfig preset 'huge'"):
        DecoderConfig.preset("huge")
    with pytest.raises(DecoderConfigError, match="hidden"):
        DecoderConfig.preset("tiny", hidden=3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vocab_size", 0, "vocab_size must be a positive int"),
        ("hidden_size", -1, "hidden_size must be a positive int"),
        ("num_layers", 1.5, "num_layers must be a positive int"),
        ("num_layers", True, "num_layers must be a positive int"),
        ("num_kv_heads", 3, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
        ("head_dim", 15, "head_dim must be even"),
        ("rope_theta", 0.0, "rope_theta must be a positive number"),
        ("rms_eps", -1e-6, "rms_eps must be a positive number"),
        ("seed", -1, "seed must be an int"),
        ("max_positions", 0, "max_positions must be a positive int"),
        ("tie_embeddings", 1, "tie_embeddings must be a bool"),
    ],
)
def test_invalid_fields_name_the_field(field, value, message):
    with pytest.raises(DecoderConfigError, match=message):
        DecoderConfig.preset("tiny", **{field: value})


def test_config_error_is_a_value_error():
    assert issubclass(DecoderConfigError, ValueError)


def test_kv_layout_follows_the_model():
    c = DecoderConfig.preset("tiny")
    layout = c.kv_layout(16)
    assert layout == KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32", "layer_first")
    paged = c.kv_layout(4, dtype="bfloat16", arrangement="page_first")
    assert (paged.page_size, paged.dtype, paged.arrangement) == (4, "bfloat16", "page_first")
    with pytest.raises(DecoderConfigError, match="arrangement 'rows'"):
        c.kv_layout(16, arrangement="rows")
    with pytest.raises(LayoutError, match="page_size"):
        c.kv_layout(0)


def test_model_id_names_the_weights():
    a, b = DecoderConfig.preset("tiny"), DecoderConfig.preset("tiny")
    assert a.model_id == b.model_id and a.model_id.startswith("kvstore-reference-decoder/")
    assert DecoderConfig.preset("tiny", seed=1).model_id != a.model_id
    assert DecoderConfig.preset("tiny", tie_embeddings=True).model_id != a.model_id


def test_config_is_frozen():
    c = DecoderConfig.preset("tiny")
    with pytest.raises(Exception):
        c.seed = 3  # type: ignore[misc]
