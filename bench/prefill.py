"""Prefill over a cached prefix against one-pass recompute, as fractions of the matmul rate.

For each context C (default 32K and 64K, Llama-3-8B preset, bf16) with a cached fraction f
(default 0.9, B = f*C rounded down to whole pages), all in one process and one JSON:

- the device's bf16 matmul rate (8192^3, the ceiling every figure is a fraction of);
- one-pass recompute: prefill of all C tokens from position 0 (the baseline);
- the suffix: prefill of tokens [B, C) with [0, B) already in the pool, once per attention
  kind: ``sdpa`` (the split attention, decoder/attention.py) and ``sdpa_lower_right`` (the
  one-call lower-right kernel it replaced);
- the parts of one layer at the suffix's shapes, times the layer count: the attention of
  each kind alone, and the gather of the context's K and V pages out of the pool (which
  one-pass prefill does too);
- how far the two kinds' last-row logits are apart, and whether the split path was taken.

TFLOP/s count matmuls and causal attention as decoder/flops.py says (FLOP_NOTE in the JSON).

    python bench/prefill.py --out bench/results/prefill_h200.json        # on the GPU
    python bench/prefill.py --device cpu --preset tiny --page-size 8 --contexts 128 --reps 1 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decoder import DecoderConfig, ReferenceDecoder  # noqa: E402
from decoder import attention as attention_mod  # noqa: E402
from decoder.flops import prefill_flops  # noqa: E402
from decoder.model import pool_view  # noqa: E402

KINDS = ("sdpa", "sdpa_lower_right")
TARGET_FRAC_OF_MATMUL = 0.65
FLOP_NOTE = ("prefill FLOPs = 2 * matmul params per token * tokens + causal attention "
             "4 * layers * heads * head_dim * (n * start + n * (n + 1) / 2) (decoder/flops.py)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/prefill.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--contexts", default="32768,65536", help="prompt lengths, comma-separated")
    p.add_argument("--fraction", type=float, default=0.9, help="cached fraction of each context")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (median)")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    if not args.contexts or any(c <= 0 or c % args.page_size for c in args.contexts):
        raise SystemExit(f"--contexts must be positive multiples of --page-size ({args.page_size})")
    if not 0.0 < args.fraction < 1.0 or args.reps <= 0:
        raise SystemExit("--fraction must lie in (0, 1) and --reps be positive")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of fn over reps runs, after one untimed warm-up."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, reps: int) -> float | None:
    """bf16 8192^3 matmul rate: the ceiling the prefill figures are fractions of (GPU only)."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = median_s(lambda: torch.matmul(a, b), device, max(reps, 10))
    return 2 * n**3 / seconds / 1e12


class Bench:
    """One model, one pool holding the longest context, and the figures of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        longest = max(args.contexts)
        self.config = DecoderConfig.preset(args.preset, max_positions=longest + args.page_size)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = ReferenceDecoder(self.config, device=self.device, dtype=dtype,
                                      attention="sdpa", draw_on="device")
        self.layout = self.config.kv_layout(args.page_size, dtype=str(dtype).removeprefix("torch."))
        num_pages = longest // args.page_size + 1
        self.pool = torch.zeros(self.layout.pool_shape(num_pages), dtype=dtype, device=self.device)
        self.table = torch.arange(num_pages, device=self.device)

    def rate(self, flops: float, seconds: float, matmul: float | None) -> dict:
        tflops = flops / seconds / 1e12
        out = {"s": seconds, "tflops": tflops}
        if matmul:
            out["frac_of_matmul"] = tflops / matmul
        return out

    def prefill(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        hidden = self.model.forward_hidden(ids[start:], start, self.pool, self.layout, self.table)
        return self.model.compute_logits(hidden[-1:])[0]

    def point(self, context: int, matmul: float | None) -> dict:
        P, reps = self.args.page_size, self.args.reps
        start = int(self.args.fraction * context) // P * P
        gen = torch.Generator().manual_seed(context)
        ids = torch.randint(0, self.config.vocab_size, (context,), generator=gen).to(self.device)
        self.model.attention = "sdpa"
        one_pass = median_s(lambda: self.prefill(ids, 0), self.device, reps)  # also fills [0, start)
        row = {"context": context, "cached_tokens": start, "computed_tokens": context - start,
               "one_pass": self.rate(prefill_flops(self.config, context)["total"], one_pass, matmul)}
        suffix_flops = prefill_flops(self.config, context - start, start)["total"]
        logits = {}
        for kind in KINDS:
            self.model.attention = kind
            seconds = median_s(lambda: self.prefill(ids, start), self.device, reps)
            row[f"suffix_{kind}"] = self.rate(suffix_flops, seconds, matmul)
            row[f"suffix_{kind}"]["speedup_vs_one_pass"] = one_pass / seconds
            logits[kind] = self.prefill(ids, start).float()
        self.model.attention = "sdpa"
        row["logits_max_abs_diff_between_kinds"] = float((logits["sdpa"] - logits["sdpa_lower_right"]).abs().max())
        row["same_first_token"] = bool(logits["sdpa"].argmax() == logits["sdpa_lower_right"].argmax())
        row["layer_parts"] = self.layer_parts(context, start, matmul)
        if matmul:
            row["meets_target"] = row["suffix_sdpa"]["frac_of_matmul"] >= TARGET_FRAC_OF_MATMUL
        return row

    def layer_parts(self, context: int, start: int, matmul: float | None) -> dict:
        """The suffix's attention alone (each kind) and the K/V gather, one layer's shapes
        times the layer count."""
        c, reps, L = self.config, self.args.reps, self.config.num_layers
        n, dtype = context - start, self.model.dtype
        q = torch.randn(n, c.num_heads, c.head_dim, device=self.device, dtype=dtype)
        k, v = (torch.randn(context, c.num_kv_heads, c.head_dim, device=self.device, dtype=dtype)
                for _ in range(2))
        pairs = n * start + n * (n + 1) / 2
        attn_flops = 4.0 * L * c.num_heads * c.head_dim * pairs
        kernels = {"sdpa": attention_mod.split_attention, "sdpa_lower_right": attention_mod.sdpa_attention}
        parts = {f"attention_{kind}": self.rate(attn_flops, L * median_s(lambda f=f: f(q, k, v), self.device, reps),
                                                matmul)
                 for kind, f in kernels.items()}
        read = self.table[: -(-context // self.args.page_size)]
        k_pages, v_pages = pool_view(self.pool, self.layout, 0, 0), pool_view(self.pool, self.layout, 0, 1)
        gather = L * median_s(lambda: (k_pages[read], v_pages[read]), self.device, reps)
        parts["kv_gather_s"] = gather
        parts["kv_gather_gbps"] = 2 * 2 * L * context * self.layout.chunk_bytes / self.args.page_size / gather / 1e9
        return parts


def print_row(row: dict) -> None:
    def fmt(r: dict) -> str:
        frac = f" ({r['frac_of_matmul']:.0%} of matmul)" if "frac_of_matmul" in r else ""
        return f"{r['s'] * 1e3:8.1f} ms {r['tflops']:7.1f} TFLOP/s{frac}"

    print(f"context {row['context']}, {row['cached_tokens']} cached:")
    print(f"  one pass          {fmt(row['one_pass'])}")
    for kind in KINDS:
        r = row[f"suffix_{kind}"]
        print(f"  suffix {kind:<17}{fmt(r)}  {r['speedup_vs_one_pass']:.2f}x one pass")
    for name, part in row["layer_parts"].items():
        if isinstance(part, dict):
            print(f"  {name:<24}{fmt(part)}")
    print(f"  K/V gather (all layers) {row['layer_parts']['kv_gather_s'] * 1e3:.2f} ms", flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    matmul = matmul_tflops(bench.device, args.reps)
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "cpu"
    out = {"device": {"name": name, "matmul_tflops": matmul}, "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "preset": args.preset,
           "dtype": str(bench.model.dtype), "page_size": args.page_size, "cached_fraction": args.fraction,
           "flop_count": FLOP_NOTE, "target_frac_of_matmul": TARGET_FRAC_OF_MATMUL, "points": []}
    for context in args.contexts:
        row = bench.point(context, matmul)
        print_row(row)
        out["points"].append(row)
    out["split_verdicts"] = {str(k): v for k, v in attention_mod._split_verdicts.items()}
    out["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
