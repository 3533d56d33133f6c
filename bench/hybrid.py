"""Hybrid model (SSD + attention layers): TTFT with the cache (pages + the state snapshot at
the hit) against recompute, and the bytes a hit loads against the dense model's.

Per point (context C x cached fraction f): the prefix base[:B] (B = f*C in whole pages) is
stored by an untimed cache run, then the prompt base[:B] + fresh tokens runs with the cache
(the hit must be B tokens: pages + the snapshot stored at the prefix's end) and without it
(recompute, the whole prompt). f = 1 resends base[:C] itself: the hit is capped at C - 1
tokens, served by the snapshot every stored prompt also keeps one page before its end.
Recorded: both TTFTs and their ratio; bytes loaded (pages + snapshot) and what the dense
preset's pages for the same hit would be; and whether the cache run's first-token logits
equal the cache-off run cut at B and where the prefix's storing run cut (``bit_equal``, see
decoder/hybrid_engine.py). Each point has its own base prompt, so its prefix is stored by
one run from position 0.

    python bench/hybrid.py --out bench/results/hybrid_h200.json              # on a GPU
    python bench/hybrid.py --device cpu --preset tiny-hybrid --page-size 8 \\
        --contexts 64,128 --chunk 8 --out /tmp/hybrid.json                   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from controller import ControllerConfig, connect
from controller.hybrid import HybridCache, default_stride_pages, snapshot_config
from decoder.config import DecoderConfig
from decoder.hybrid_config import HYBRID_PRESETS, HybridConfig
from decoder.hybrid_engine import HybridEngine
from decoder.hybrid_model import HybridDecoder, num_parameters
from kvstore.page_keys import KeyNamespace


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/hybrid.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="hybrid-8b")
    p.add_argument("--dense-preset", default=None,
                   help="the dense model whose bytes per hit we compare (default: the hybrid's base)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--contexts", default="32768,65536")
    p.add_argument("--fractions", default="0.5,0.9,1.0")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk tokens")
    p.add_argument("--reps", type=int, default=2, help="timed runs per point (median)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="model and KV dtype; auto: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--attention", choices=("auto", "explicit", "sdpa"), default="auto",
                   help="auto: sdpa (fused kernels) on a GPU, explicit on CPU")
    args = p.parse_args(argv)
    if args.dense_preset is None:
        args.dense_preset = HYBRID_PRESETS[args.preset][0] if args.preset in HYBRID_PRESETS else "llama3-8b"
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.fractions = [float(x) for x in args.fractions.split(",")]
    if any(c % args.page_size for c in args.contexts) or args.chunk % args.page_size:
        p.error("contexts and --chunk must be multiples of --page-size")
    return args


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    longest = max(args.contexts)
    on_gpu = device.type == "cuda"
    base_cfg = HybridConfig.preset(args.preset)
    config = HybridConfig.preset(args.preset)
    config = HybridConfig(**{**config.__dict__, "base": DecoderConfig(**{
        **base_cfg.base.__dict__, "max_positions": longest + 2 * args.page_size})})
    kv_dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, kv_dtype)
    attention = args.attention if args.attention != "auto" else ("sdpa" if on_gpu else "explicit")
    model = HybridDecoder(config, device=device, dtype=dtype, attention=attention,
                          draw_on="device" if on_gpu else "cpu")
    P = args.page_size
    num_pages = -(-(longest + 1) // P) + 2
    plain = HybridEngine(model, P, num_pages, kv_dtype, args.chunk, num_snapshot_slots=1)
    cached = HybridEngine(model, P, num_pages, kv_dtype, args.chunk, num_snapshot_slots=8)
    kv_ns = KeyNamespace(config.model_id, cached.pools.kv_layout)
    snap_ns = KeyNamespace(config.model_id, cached.snapshot_layout)
    align = cached.align_pages
    stride = default_stride_pages(cached.codec.nbytes, cached.pools.kv_layout.page_bytes, align)
    # L2 holds the current point's stored prefix (pages and snapshots); older points' entries
    # are evicted (least recently used) as new ones come.
    snapshots_needed = longest // (stride * P) + 2 + 4
    cache = HybridCache(
        connect(ControllerConfig(host_pool_pages=longest // P + 16), kv_ns, cached.pools.kv),
        connect(snapshot_config(ControllerConfig(host_pool_pages=snapshots_needed)), snap_ns,
                cached.snapshot_pool),
        kv_ns.digest(), stride, align_pages=align)
    cached.attach_cache(cache)
    dense_page_bytes = DecoderConfig.preset(args.dense_preset).kv_layout(P, kv_dtype).page_bytes
    out = {
        "device": device_name(device), "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"preset": args.preset, "pattern": config.pattern, "parameters": num_parameters(model),
                  "dtype": str(dtype), "attention": attention, "page_size": P, "prefill_chunk_len": args.chunk,
                  "kv_page_bytes": cached.pools.kv_layout.page_bytes, "snapshot_bytes": cached.codec.nbytes,
                  "snapshot_stride_pages": stride, "dense_preset": args.dense_preset,
                  "dense_page_bytes": dense_page_bytes},
        "setup_s": time.perf_counter() - started, "points": [],
    }
    vocab = config.base.vocab_size
    try:
        for context in args.contexts:
            for i, fraction in enumerate(args.fractions):
                base = np.random.default_rng([context, i]).integers(0, vocab, context).tolist()
                point = run_point(plain, cached, base, context, fraction, args, vocab)
                point["bytes_vs_dense"] = point["loaded_bytes"] / max(1, point["cached_tokens"] // P * dense_page_bytes)
                point["dense_loaded_bytes"] = point["cached_tokens"] // P * dense_page_bytes
                out["points"].append(point)
                print(json.dumps(point))
                save(out, args.out, started)
    finally:
        cache.close()
    save(out, args.out, started)
    return out


def run_point(plain: HybridEngine, cached: HybridEngine, base: list[int], context: int, fraction: float,
              args: argparse.Namespace, vocab: int) -> dict:
    P = args.page_size
    if fraction >= 1.0:
        stored = base[:context]
        prompts = [stored] * args.reps
        expect = (context - 1) // P * P
    else:
        B = int(fraction * context) // P * P
        stored, expect = base[:B], B
        # a fresh tail per timed run: each run stores its own prompt, which must not become
        # the next run's hit
        prompts = [base[:B] + np.random.default_rng([context, B, 7, rep]).integers(
            0, vocab, context - B).tolist() for rep in range(args.reps)]
    prompt = prompts[0]
    # where the storing run cut (its end-of-prompt snapshots), for the cache-off twin
    stored_cuts = [(len(stored) - 1) // P * P, len(stored) // P * P]
    cached.generate(stored, 1)                                       # stores pages + snapshots
    runs = [cached.generate(p, 1) for p in prompts]
    for r in runs:
        if r.num_cached_tokens != expect:
            raise AssertionError(f"context {context} fraction {fraction}: the hit is "
                                 f"{r.num_cached_tokens} tokens, expected {expect}")
    plain.generate(prompt, 1)                                        # warm-up
    recompute = [plain.generate(prompt, 1) for _ in range(args.reps)]
    split = plain.generate(prompt, 1, split_at=[expect, *stored_cuts])
    first = runs[0]
    return {
        "context": context, "fraction": fraction, "cached_tokens": first.num_cached_tokens,
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "recompute_ttft_s": statistics.median(r.ttft_s for r in recompute),
        "speedup": statistics.median(r.ttft_s for r in recompute) / statistics.median(r.ttft_s for r in runs),
        "loaded_bytes": first.loaded_bytes, "snapshot_tier": first.snapshot_tier,
        "bit_equal": bool(torch.equal(first.logits, split.logits)),
        "max_abs_logit_diff_vs_split": float((first.logits - split.logits).abs().max()),
        "same_first_token": first.tokens == split.tokens,
    }


def save(out: dict, path: Path, started: float) -> None:
    out["total_s"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
