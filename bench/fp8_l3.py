"""fp8 copies in a disk L3 against lossless ones: accuracy, TTFT and bytes, on the reference decoder.

Per context (default 16K and 32K, Llama-3-8B preset, bf16), for each L3 encoding (lossless,
fp8_e4m3): a writer stores the first ``--fraction`` of the prompt (whole pages) to L2 and,
written through, to a fresh disk L3; the page cache is dropped; a reader with an empty L2
runs the whole prompt (its prefix read from disk) and decodes ``--decode-steps`` tokens.
Reported, all from the same run:

- TTFT of each encoding and their ratio, and one-pass recompute's TTFT;
- L3 bytes written per page byte (fp8: target 0.5 +- 2%);
- the fp8 run against the lossless one over the decode steps: the first step whose token
  differs (None: none did), the largest logit difference before it, absolute and relative to
  the largest logit; the lossless run against a cache-off run split at the same boundary
  (bit-equal: the lossless path is exact).

    python bench/fp8_l3.py --out bench/results/fp8_l3_h200.json                         # on the GPU
    python bench/fp8_l3.py --device cpu --preset tiny --page-size 8 --contexts 128 --decode-steps 4 --out /tmp/f.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import controller  # noqa: E402
from controller import ControllerConfig, L3Config  # noqa: E402
from decoder import DecoderConfig, GenerationResult, ReferenceDecoder, ReferenceEngine  # noqa: E402
from kvstore.page_keys import KeyNamespace  # noqa: E402

from e2e import drop_page_cache  # noqa: E402

ENCODINGS = ("lossless", "fp8_e4m3")
BYTES_TARGET = (0.49, 0.51)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/fp8_l3.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--contexts", default="16384,32768", help="prompt lengths, comma-separated")
    p.add_argument("--fraction", type=float, default=0.9, help="part of each prompt read from the disk L3")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--disk-dir", default=None, help="where the disk L3 lives (default: a temp dir)")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    if not args.contexts or any(c <= 0 or c % args.page_size for c in args.contexts):
        raise SystemExit(f"--contexts must be positive multiples of --page-size ({args.page_size})")
    if not 0.0 < args.fraction <= 1.0 or args.decode_steps <= 0:
        raise SystemExit("--fraction must lie in (0, 1] and --decode-steps be positive")
    return args


class Bench:
    """The model, a cache-less engine and an engine the disk-backed caches attach to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        longest = max(args.contexts) + args.decode_steps
        config = DecoderConfig.preset(args.preset, max_positions=longest + args.page_size)
        self.model = ReferenceDecoder(config, device=self.device, dtype=torch.bfloat16,
                                      attention="sdpa", draw_on="device")
        self.layout = config.kv_layout(args.page_size, dtype="bfloat16")
        num_pages = -(-longest // args.page_size) + 2
        chunk = -(-config.max_positions // args.page_size) * args.page_size   # one-pass prefill
        self.plain = ReferenceEngine(self.model, self.layout, num_pages, prefill_chunk_len=chunk)
        self.cached = ReferenceEngine(self.model, self.layout, num_pages, prefill_chunk_len=chunk)
        self.namespace = KeyNamespace(config.model_id, self.layout)

    @property
    def config(self) -> DecoderConfig:
        return self.model.config

    def run(self, encoding: str, prompt: list[int], boundary: int) -> dict:
        """Store prompt[:boundary] through a fresh disk L3 of ``encoding``, then run the prompt
        with an empty L2 (its prefix read from disk) and decode."""
        args, engine = self.args, self.cached
        with tempfile.TemporaryDirectory(prefix="kvstore-fp8-", dir=args.disk_dir) as path:
            l3 = L3Config(connector="disk", options={"path": path, "capacity_bytes": 4 * len(prompt) * self.layout.page_bytes // args.page_size},
                          write_policy="write_through", timeout_s=300.0, encoding=encoding)
            config = ControllerConfig(host_pool_pages=len(prompt) // args.page_size + 8, l3=l3)
            with controller.connect(config, self.namespace, engine.kv_pool) as writer:
                engine.attach_cache(writer)
                engine.generate(prompt[:boundary], 1)
                stored = wait_written(writer, boundary // args.page_size)
            dropped = drop_page_cache(path)
            with controller.connect(config, self.namespace, engine.kv_pool) as reader:
                engine.attach_cache(reader)
                result = engine.generate(prompt, args.decode_steps)
            engine.attach_cache(None)
        return {"result": result, "page_cache_dropped": dropped, "l3_bytes_written": stored.l3_bytes_written,
                "l3_page_bytes_written": stored.l3_page_bytes_written}

    def point(self, context: int) -> dict:
        P, steps = self.args.page_size, self.args.decode_steps
        prompt = np.random.default_rng(context).integers(0, self.config.vocab_size, context).tolist()
        boundary = int(self.args.fraction * context) // P * P
        self.plain.generate(prompt, 1)                               # warm-up of the shapes
        recompute = statistics.median(self.plain.generate(prompt, 1).ttft_s for _ in range(2))
        runs = {enc: self.run(enc, prompt, boundary) for enc in ENCODINGS}
        exact, lossy = runs["lossless"]["result"], runs["fp8_e4m3"]["result"]
        split = self.plain.generate(prompt, steps, split_at=exact.num_cached_tokens)
        row = {"context": context, "cached_tokens": exact.num_cached_tokens, "decode_steps": steps,
               "ttft_recompute_s": recompute, "lossless_equals_split_run": bool(torch.equal(exact.logits, split.logits))}
        for enc, run in runs.items():
            res: GenerationResult = run["result"]
            row[enc] = {"ttft_s": res.ttft_s, "l3_tokens": res.num_l3_tokens,
                        "speedup_vs_recompute": recompute / res.ttft_s,
                        "page_cache_dropped": run["page_cache_dropped"],
                        "l3_bytes_written": run["l3_bytes_written"],
                        "l3_bytes_per_page_byte": run["l3_bytes_written"] / max(run["l3_page_bytes_written"], 1)}
        row["ttft_fp8_over_lossless"] = lossy.ttft_s / exact.ttft_s
        row["accuracy"] = compare(lossy, exact)
        ratio = row["fp8_e4m3"]["l3_bytes_per_page_byte"]
        row["bytes_target_met"] = BYTES_TARGET[0] <= ratio <= BYTES_TARGET[1]
        return row


def wait_written(cache, num_pages: int, timeout_s: float = 600.0):
    """The cache's stats once its write-through has put num_pages pages in L3."""
    deadline = time.monotonic() + timeout_s
    while (stats := cache.stats()).num_l3_written_pages < num_pages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stats.num_l3_written_pages} of {num_pages} pages reached L3 in {timeout_s}s")
        time.sleep(0.01)
    return stats


def compare(lossy: GenerationResult, exact: GenerationResult) -> dict:
    """The fp8 run against the lossless one, step by step (row i produced token i)."""
    same = [a == b for a, b in zip(lossy.tokens, exact.tokens)]
    first_flip = same.index(False) if False in same else None
    upto = len(same) if first_flip is None else first_flip + 1   # the flipped step's logits count too
    diff = (lossy.logits[:upto] - exact.logits[:upto]).abs().amax(dim=-1)
    scale = float(exact.logits[:upto].abs().max())
    return {"first_flipped_step": first_flip, "steps_compared": upto,
            "max_logit_abs_diff": float(diff.max()), "max_logit_rel_diff": float(diff.max()) / scale,
            "first_token_logit_abs_diff": float(diff[0]), "logit_abs_max": scale,
            "first_token_equal": lossy.tokens[0] == exact.tokens[0]}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "cpu"
    out = {"device": name, "torch": torch.__version__, "preset": args.preset, "page_size": args.page_size,
           "fraction_from_disk": args.fraction, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "cpus": os.cpu_count(), "bytes_target": BYTES_TARGET, "points": []}
    for context in args.contexts:
        row = bench.point(context)
        out["points"].append(row)
        acc = row["accuracy"]
        print(f"{context}: TTFT lossless {row['lossless']['ttft_s']:.3f}s fp8 {row['fp8_e4m3']['ttft_s']:.3f}s "
              f"({row['ttft_fp8_over_lossless']:.2f}x), recompute {row['ttft_recompute_s']:.3f}s; L3 bytes "
              f"{row['fp8_e4m3']['l3_bytes_per_page_byte']:.4f}x; first flipped step {acc['first_flipped_step']}, "
              f"max logit diff {acc['max_logit_abs_diff']:.4g} ({acc['max_logit_rel_diff']:.2%})", flush=True)
        out["total_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
