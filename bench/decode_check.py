"""Bit-exactness of cache runs through decode on a GPU: the cache run of a 32K prompt
(90% loaded from L2) against the cache-off run split at the same boundary, over 64
greedy decode steps, in a fresh process and again after other shapes ran first (as
bench/e2e.py's grid does). Prints one line per check (logit rows that differ: none
expected).

    python bench/decode_check.py > bench/results/decode_check_h200.txt      # on the GPU
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from controller import ControllerConfig, connect  # noqa: E402
from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine  # noqa: E402
from kvstore.page_keys import KeyNamespace  # noqa: E402


def tokens(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


ctx, P, steps = 32768, 64, 64
config = DecoderConfig.preset("llama3-8b", max_positions=65536 + 2 * P + steps)
model = ReferenceDecoder(config, device=torch.device("cuda"), dtype=torch.bfloat16, attention="sdpa", draw_on="device")
layout = config.kv_layout(P, dtype="bfloat16")
n = 65536 // P + 8
chunk = -(-config.max_positions // P) * P
plain = ReferenceEngine(model, layout, n, prefill_chunk_len=chunk)
cached = ReferenceEngine(model, layout, n, prefill_chunk_len=chunk)
cache = connect(ControllerConfig(host_pool_pages=2 * n), KeyNamespace(config.model_id, layout), cached.kv_pool)
cached.attach_cache(cache)

def check(tag, seed):
    prompt = tokens(config.vocab_size, ctx, seed=seed)
    boundary = int(0.9 * ctx) // P * P
    cached.generate(prompt[:boundary], 1)
    a = cached.generate(prompt, steps)
    b = plain.generate(prompt, steps, split_at=a.num_cached_tokens)
    same = [x == y for x, y in zip(a.tokens, b.tokens)]
    rows = (a.logits != b.logits).any(dim=-1).nonzero().flatten().tolist()
    print(tag, "cached", a.num_cached_tokens, "tokens equal", a.tokens == b.tokens,
          "first differing logit row", rows[:3], "first token diff", same.index(False) if False in same else None)
    return not rows

ok = check("fresh", 4242)
for c, f in ((4096, 0.5), (16384, 0.9), (65536, 0.9)):   # other shapes first, as the grid does
    p = tokens(config.vocab_size, c, seed=c)
    cached.generate(p[: int(f * c) // P * P], 1)
    cached.generate(p, 1)
ok = check("after other shapes", 4343) and ok
sys.exit(0 if ok else 1)
