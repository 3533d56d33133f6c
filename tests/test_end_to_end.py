"""The reference decoder over the embedded cache: identical output, hits from L2 and from disk."""

import numpy as np
import pytest
import torch

from controller import ControllerConfig, L3Config, connect
from controller.config import PrefetchConfig
from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine
from kvstore.page_keys import KeyNamespace

PAGE = 8


def conversation(vocab: int, seed: int = 7):
    """Two agent sessions over one system prompt, interleaved: (session, new tokens) per turn."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, 64).tolist()
    turns = [("A", 40), ("B", 37), ("A", 21), ("B", 50), ("A", 30), ("B", 9), ("A", 16)]
    return system, [(s, rng.integers(0, vocab, n).tolist()) for s, n in turns]


def run_pair(tmp_path, device: str, arrangement: str, host_pages: int):
    config = DecoderConfig.preset("tiny")
    layout = config.kv_layout(PAGE, arrangement=arrangement)
    model = ReferenceDecoder(config, device=torch.device(device))
    plain = ReferenceEngine(model, layout, 128)
    cached = ReferenceEngine(model, layout, 128)
    l3 = L3Config("disk", {"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 30})
    # wait_complete: this test is about the tiers and exact output, not auto's choice
    # (a tiny model recomputes so fast that auto may rightly skip the disk)
    cache = connect(ControllerConfig(host_pool_pages=host_pages, l3=l3,
                                     prefetch=PrefetchConfig(policy="wait_complete")),
                    KeyNamespace(config.model_id, layout), cached.kv_pool)
    cached.attach_cache(cache)
    system, turns = conversation(config.vocab_size)
    history: dict[str, list[int]] = {}
    totals = {"l2": 0, "l3": 0}
    for session, new in turns:
        prompt = history.get(session, system) + new
        a = cached.generate(prompt, 4)
        b = plain.generate(prompt, 4)
        assert a.tokens == b.tokens, f"turn of {session}: tokens differ"
        assert torch.equal(a.logits, b.logits), f"turn of {session}: logits differ"
        assert a.num_cached_tokens + a.num_computed_tokens == len(prompt)
        totals["l2"] += a.num_l2_tokens
        totals["l3"] += a.num_l3_tokens
        history[session] = prompt + a.tokens
        cache.check_integrity(quiescent=True)
    cache.close()
    return totals


@pytest.mark.parametrize("arrangement", ["layer_first", "page_first"])
def test_cache_on_equals_cache_off_with_hits_from_l2_and_disk(tmp_path, arrangement):
    # 20 host pages cannot hold both sessions, so pages spill to disk and come back.
    totals = run_pair(tmp_path, "cpu", arrangement, host_pages=20)
    assert totals["l2"] > 0
    assert totals["l3"] > 0


def test_large_host_pool_serves_everything_from_l2(tmp_path):
    totals = run_pair(tmp_path, "cpu", "layer_first", host_pages=512)
    assert totals["l2"] > 0 and totals["l3"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_on_equals_cache_off_on_cuda(tmp_path):
    totals = run_pair(tmp_path, "cuda", "layer_first", host_pages=20)
    assert totals["l2"] > 0 and totals["l3"] > 0
