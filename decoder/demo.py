"""``kvstore demo``: an agent-style multi-turn conversation on the reference decoder.

Three agent sessions share a system prompt; each turn resends the whole
conversation plus a tool result and a user message. The host pool (L2) is kept
small, so while the other sessions run a session's pages are evicted to the
disk tier (L3); when it comes back, its prefix is loaded from L2 and disk
instead of recomputed. Every turn also runs on a second engine with no cache
and the two outputs (tokens and logits) are compared bit for bit.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from controller import ControllerConfig, L3Config, connect
from decoder.config import DecoderConfig
from decoder.engine import GenerationResult, ReferenceEngine
from decoder.model import ReferenceDecoder
from kvstore.page_keys import KeyNamespace

# (session, tokens this turn adds before the user's next question is answered)
_SCRIPT: list[tuple[str, int]] = [
    ("A", 300), ("B", 260), ("A", 140), ("C", 420), ("B", 120), ("A", 160), ("C", 90), ("B", 200),
]


@dataclass
class TurnRow:
    session: str
    prompt_len: int
    l2_tokens: int
    disk_tokens: int
    computed_tokens: int
    ttft_cached_ms: float
    ttft_plain_ms: float
    identical: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    parser.add_argument("--preset", default="small", help="decoder size: tiny or small")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--host-pages", type=int, default=96,
                        help="L2 size in pages; small on purpose so pages spill to disk")
    parser.add_argument("--system-prompt", type=int, default=384, help="tokens of the shared system prompt")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per turn")
    parser.add_argument("--l3-dir", default=None, help="disk tier directory (default: a temp dir)")
    parser.add_argument("--daemon", action="store_true",
                        help="start a kvstore daemon and run two engine processes against it "
                             "(decoder.daemon_demo): pages one computes, the other loads")
    parser.add_argument("--hybrid", action="store_true",
                        help="a hybrid model (SSD + attention layers; --preset tiny-hybrid or "
                             "small-hybrid, default small-hybrid): pages + state snapshots "
                             "(decoder.hybrid_demo)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch; 1 keeps timings steady on a busy machine")


def run(args: argparse.Namespace) -> int:
    if args.hybrid:
        from decoder.hybrid_demo import run as run_hybrid

        return run_hybrid(args)
    if args.daemon:
        from decoder.daemon_demo import run as run_with_daemon

        return run_with_daemon(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = DecoderConfig.preset(args.preset)
    layout = config.kv_layout(args.page_size)
    model = ReferenceDecoder(config, device=device)
    num_device_pages = 4096 // args.page_size + 8
    plain = ReferenceEngine(model, layout, num_device_pages)
    cached = ReferenceEngine(model, layout, num_device_pages)
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        l3 = L3Config(connector="disk", options={
            "path": args.l3_dir or tmp, "capacity_bytes": 4 << 30})
        cache = connect(ControllerConfig(host_pool_pages=args.host_pages, l3=l3),
                        KeyNamespace(config.model_id, layout), cached.kv_pool)
        cached.attach_cache(cache)
        try:
            rows = _converse(plain, cached, config.vocab_size, args)
        finally:
            cache.close()
    _print_table(rows, args, model)
    return 0 if all(r.identical for r in rows) else 1


def _converse(plain: ReferenceEngine, cached: ReferenceEngine, vocab: int, args) -> list[TurnRow]:
    rng = np.random.default_rng(1234)
    system = rng.integers(0, vocab, args.system_prompt).tolist()
    history: dict[str, list[int]] = {}
    rows = []
    plain.generate(system[:32], 1)  # warm up kernels so the first turn's timing is fair
    for session, added in _SCRIPT:
        context = history.get(session, system)
        prompt = context + rng.integers(0, vocab, added).tolist()
        with_cache = cached.generate(prompt, args.new_tokens)
        without = plain.generate(prompt, args.new_tokens)
        history[session] = prompt + with_cache.tokens
        rows.append(_row(session, with_cache, without))
    return rows


def _row(session: str, cached: GenerationResult, plain: GenerationResult) -> TurnRow:
    identical = cached.tokens == plain.tokens and torch.equal(cached.logits, plain.logits)
    return TurnRow(session, cached.prompt_len, cached.num_l2_tokens, cached.num_l3_tokens,
                   cached.num_computed_tokens, cached.ttft_s * 1e3, plain.ttft_s * 1e3, identical)


def _print_table(rows: list[TurnRow], args, model: ReferenceDecoder) -> None:
    print(f"kvstore demo: reference decoder '{args.preset}' on {model.device}, pages of "
          f"{args.page_size} tokens, L2 = {args.host_pages} pages, L3 = disk\n")
    head = (f"{'turn':>4} {'session':>7} {'prompt':>7} {'from L2':>8} {'from disk':>9} "
            f"{'computed':>8} {'TTFT cache':>11} {'TTFT no cache':>13} {'speedup':>7}  same output")
    print(head)
    print("-" * len(head))
    for i, r in enumerate(rows, 1):
        print(f"{i:>4} {r.session:>7} {r.prompt_len:>7} {r.l2_tokens:>8} {r.disk_tokens:>9} "
              f"{r.computed_tokens:>8} {r.ttft_cached_ms:>8.1f} ms {r.ttft_plain_ms:>10.1f} ms "
              f"{r.ttft_plain_ms / r.ttft_cached_ms:>6.1f}x  {'yes' if r.identical else 'NO'}")
    prompt = sum(r.prompt_len for r in rows)
    l2, disk = sum(r.l2_tokens for r in rows), sum(r.disk_tokens for r in rows)
    cached_ms, plain_ms = sum(r.ttft_cached_ms for r in rows), sum(r.ttft_plain_ms for r in rows)
    print(f"\n{prompt} prompt tokens: {l2} from L2 ({l2 / prompt:.0%}), {disk} from disk "
          f"({disk / prompt:.0%}); total TTFT {cached_ms:.0f} ms with the cache vs "
          f"{plain_ms:.0f} ms without ({plain_ms / cached_ms:.1f}x)")
    same = all(r.identical for r in rows)
    print("tokens and logits with the cache equal those without it, bit for bit: "
          + ("yes" if same else "NO"))
