"""``kvstore demo --hybrid``: the agent conversation of decoder/demo.py on a hybrid model
(SSD + full-attention layers): each turn's prefix comes back as pages plus the state
snapshot at its end, from L2 or from the disk tier, and every turn is compared bit for bit
(tokens and logits) with a cache-off run split at the same boundary.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from controller import ControllerConfig, L3Config, connect
from controller.hybrid import HybridCache, default_stride_pages, snapshot_config
from decoder.demo import _SCRIPT
from decoder.hybrid_config import HybridConfig
from decoder.hybrid_engine import HybridEngine, HybridResult
from decoder.hybrid_model import HybridDecoder
from kvstore.page_keys import KeyNamespace


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    preset = args.preset if args.preset.endswith("hybrid") or "hybrid-" in args.preset else "small-hybrid"
    config = HybridConfig.preset(preset)
    model = HybridDecoder(config, device=torch.device(args.device))
    P = args.page_size
    num_pages = 4096 // P + 8
    plain, cached = HybridEngine(model, P, num_pages), HybridEngine(model, P, num_pages, num_snapshot_slots=8)
    kv_ns = KeyNamespace(config.model_id, cached.pools.kv_layout)
    snap_ns = KeyNamespace(config.model_id, cached.snapshot_layout)
    align = cached.align_pages
    stride = default_stride_pages(cached.codec.nbytes, cached.pools.kv_layout.page_bytes, align)
    with tempfile.TemporaryDirectory(prefix="kvstore-hybrid-demo-") as tmp:
        root = args.l3_dir or tmp

        def l3(name: str) -> L3Config:
            return L3Config(connector="disk", options={"path": os.path.join(root, name),
                                                       "capacity_bytes": 4 << 30})
        # L2 is small on purpose (pages and 3 snapshots): sessions spill to disk between turns.
        cache = HybridCache(
            connect(ControllerConfig(host_pool_pages=args.host_pages, l3=l3("pages")), kv_ns, cached.pools.kv),
            connect(snapshot_config(ControllerConfig(host_pool_pages=3, l3=l3("snapshots"))), snap_ns,
                    cached.snapshot_pool),
            kv_ns.digest(), stride, align_pages=align)
        cached.attach_cache(cache)
        try:
            rows = _converse(plain, cached, config.base.vocab_size, args)
        finally:
            cache.close()
    print(f"kvstore demo --hybrid: '{preset}' ({config.pattern}: S = SSD, A = attention) on "
          f"{model.device}; pages of {P} tokens, L2 = {args.host_pages} pages + 3 snapshots, "
          f"L3 = disk; a snapshot ({cached.codec.nbytes / 1024:.0f} KiB) every {stride} pages "
          f"and at each prompt's end\n")
    head = (f"{'turn':>4} {'session':>7} {'prompt':>7} {'from L2':>8} {'from disk':>9} {'snapshot':>8} "
            f"{'computed':>8} {'TTFT cache':>11} {'TTFT no cache':>13}  same output")
    print(head + "\n" + "-" * len(head))
    for i, (session, got, want) in enumerate(rows, 1):
        same = got.tokens == want.tokens and torch.equal(got.logits, want.logits)
        print(f"{i:>4} {session:>7} {got.prompt_len:>7} {got.num_l2_tokens:>8} {got.num_l3_tokens:>9} "
              f"{got.snapshot_tier or '-':>8} {got.prompt_len - got.num_cached_tokens:>8} "
              f"{got.ttft_s * 1e3:>8.1f} ms {want.ttft_s * 1e3:>10.1f} ms  {'yes' if same else 'NO'}")
    all_same = all(g.tokens == w.tokens and torch.equal(g.logits, w.logits) for _, g, w in rows)
    l2 = sum(g.num_l2_tokens for _, g, _ in rows)
    l3_tokens = sum(g.num_l3_tokens for _, g, _ in rows)
    print(f"\n{l2} prompt tokens from L2, {l3_tokens} from disk; tokens and logits with the cache "
          f"equal the cache-off runs split at the same boundary, bit for bit: {'yes' if all_same else 'NO'}")
    return 0 if all_same else 1


def _converse(plain: HybridEngine, cached: HybridEngine, vocab: int,
              args) -> list[tuple[str, HybridResult, HybridResult]]:
    rng = np.random.default_rng(1234)
    system = rng.integers(0, vocab, args.system_prompt).tolist()
    history: dict[str, list[int]] = {}
    rows = []
    for session, added in _SCRIPT:
        prompt = history.get(session, system) + rng.integers(0, vocab, added).tolist()
        got = cached.generate(prompt, args.new_tokens)
        want = plain.generate(prompt, args.new_tokens, split_at=got.num_cached_tokens)
        history[session] = prompt + got.tokens
        rows.append((session, got, want))
    return rows
