"""The reference decoder over a disk L3 that keeps fp8 copies (L3Config.encoding="fp8_e4m3"):
pages come back lossy but close, L3 holds half the bytes, a lossless reader of the same
store misses them (and computes the exact result), and only bf16 layouts may opt in."""

import time

import numpy as np
import pytest
import torch

from connectors import codec, fp8
from controller import ConfigError, ControllerConfig, L3Config, connect
from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine
from kvstore.page_keys import KeyNamespace

PAGE = 8


def cache_for(engine: ReferenceEngine, config: DecoderConfig, disk: str, encoding: str):
    l3 = L3Config("disk", {"path": disk, "capacity_bytes": 1 << 30}, write_policy="write_through",
                  encoding=encoding)
    return connect(ControllerConfig(host_pool_pages=64, l3=l3),
                   KeyNamespace(config.model_id, engine.layout), engine.kv_pool)


def written_through(cache, num_pages: int, timeout_s: float = 30.0):
    """Stats once the backup queue has written num_pages pages to L3."""
    deadline = time.monotonic() + timeout_s
    while (stats := cache.stats()).num_l3_written_pages < num_pages:
        assert time.monotonic() < deadline, f"{stats.num_l3_written_pages} of {num_pages} pages written"
        time.sleep(0.01)
    return stats


def test_fp8_disk_l3_gives_close_logits_at_half_the_bytes(tmp_path):
    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config, dtype=torch.bfloat16)
    layout = config.kv_layout(PAGE, dtype="bfloat16")
    rng = np.random.default_rng(3)
    system = rng.integers(0, config.vocab_size, 96).tolist()
    prompt = system + rng.integers(0, config.vocab_size, 13).tolist()
    disk = str(tmp_path / "disk")

    writer = ReferenceEngine(model, layout, 64)
    cache = cache_for(writer, config, disk, "fp8_e4m3")
    writer.attach_cache(cache)
    writer.generate(system, 1)                       # the system prompt's 12 pages, bf16 in L2
    stats = written_through(cache, 12)               # and fp8 on disk
    cache.close()
    assert stats.l3_page_bytes_written == 12 * layout.page_bytes
    # half the page, plus a header, a descriptor and one exponent per chunk (at 8B size: 0.5000x)
    frame_len = codec.HEADER_LEN + fp8.payload_len(layout.page_bytes, layout.chunk_numel)
    assert stats.l3_bytes_written == 12 * frame_len
    assert frame_len == layout.page_bytes // 2 + 48 + 16 + 8

    plain = ReferenceEngine(model, layout, 64).generate(prompt, 8)
    reader = ReferenceEngine(model, layout, 64)       # a new L2: the prefix comes from disk
    cache = cache_for(reader, config, disk, "fp8_e4m3")
    reader.attach_cache(cache)
    lossy = reader.generate(prompt, 8)
    cache.check_integrity(quiescent=True)
    cache.close()
    assert lossy.num_l3_tokens == 96 and lossy.num_cached_tokens == 96
    diff = (lossy.logits - plain.logits).abs().max()
    assert 0 < diff < 0.05 * plain.logits.abs().max()   # lossy, and close
    assert lossy.tokens[0] == plain.tokens[0]


def test_a_lossless_reader_misses_fp8_pages_and_stays_exact(tmp_path):
    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config, dtype=torch.bfloat16)
    layout = config.kv_layout(PAGE, dtype="bfloat16")
    prompt = np.random.default_rng(4).integers(0, config.vocab_size, 70).tolist()
    disk = str(tmp_path / "disk")
    writer = ReferenceEngine(model, layout, 64)
    cache = cache_for(writer, config, disk, "fp8_e4m3")
    writer.attach_cache(cache)
    writer.generate(prompt[:64], 1)
    cache.close()

    reader = ReferenceEngine(model, layout, 64)
    cache = cache_for(reader, config, disk, "lossless")
    reader.attach_cache(cache)
    got = reader.generate(prompt, 4)
    stats = cache.stats()
    cache.close()
    plain = ReferenceEngine(model, layout, 64).generate(prompt, 4)
    assert got.num_l3_tokens == 0 and stats.num_l3_bad_values > 0
    assert torch.equal(got.logits, plain.logits)


def test_fp8_needs_a_bf16_layout(tmp_path):
    config = DecoderConfig.preset("tiny")
    engine = ReferenceEngine(ReferenceDecoder(config), config.kv_layout(PAGE), 8)   # float32
    with pytest.raises(ConfigError, match="needs a bfloat16 layout"):
        cache_for(engine, config, str(tmp_path / "disk"), "fp8_e4m3")
    with pytest.raises(ConfigError, match="encoding 'fp4' is unknown"):
        L3Config("disk", encoding="fp4")
