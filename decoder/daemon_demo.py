"""``kvstore demo --daemon``: two engine processes share one ``kvstore serve`` daemon.

A daemon is started for the decoder's KV layout; engine A (its own process) runs
an agent's first turns, engine B (another process, started after A exits) runs a
second agent with the same system prompt and then resumes A's conversation: the
pages B loads were computed by A. Each engine also runs every prompt without a
cache and compares tokens and logits bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]


def _prompts(vocab: int, system_len: int) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(4321)
    system = rng.integers(0, vocab, system_len).tolist()
    a1 = system + rng.integers(0, vocab, 200).tolist()
    a2 = a1 + rng.integers(0, vocab, 120).tolist()
    b1 = system + rng.integers(0, vocab, 150).tolist()
    a3 = a2 + rng.integers(0, vocab, 90).tolist()
    return {"A": [a1, a2], "B": [b1, a3]}


def engine_main(address: str, role: str, preset: str, page_size: int, system_len: int,
                new_tokens: int) -> int:
    """One engine process: run this role's prompts with the daemon's cache and without."""
    import torch

    from controller import connect_daemon
    from decoder.config import DecoderConfig
    from decoder.engine import ReferenceEngine
    from decoder.model import ReferenceDecoder
    from kvstore.page_keys import KeyNamespace

    torch.set_num_threads(1)
    config = DecoderConfig.preset(preset)
    layout = config.kv_layout(page_size)
    model = ReferenceDecoder(config, device=torch.device("cpu"))
    pages = 4096 // page_size + 8
    plain, cached = ReferenceEngine(model, layout, pages), ReferenceEngine(model, layout, pages)
    cache = connect_daemon(address, KeyNamespace(config.model_id, layout), cached.kv_pool,
                           client_name=f"engine-{role}")
    cached.attach_cache(cache)
    try:
        for prompt in _prompts(config.vocab_size, system_len)[role]:
            hit = cached.generate(prompt, new_tokens)
            miss = plain.generate(prompt, new_tokens)
            same = hit.tokens == miss.tokens and torch.equal(hit.logits, miss.logits)
            print(json.dumps({"engine": role, "pid": os.getpid(), "prompt": hit.prompt_len,
                              "from_daemon": hit.num_cached_tokens, "computed": hit.num_computed_tokens,
                              "ttft_cache_ms": hit.ttft_s * 1e3, "ttft_plain_ms": miss.ttft_s * 1e3,
                              "identical": same}), flush=True)
    finally:
        cache.close()
    return 0


def run(args: argparse.Namespace) -> int:
    from controller.daemon.launch import serve_command, wait_until_serving
    from decoder.config import DecoderConfig

    layout = DecoderConfig.preset(args.preset).kv_layout(args.page_size)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        address = f"ipc://{tmp}/run/kvstore.sock"
        serve = serve_command(address, layout, args.host_pages)
        daemon = subprocess.Popen(serve, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            try:
                wait_until_serving(address, daemon, timeout_s=60)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}: {daemon.stderr.read() if daemon.poll() is not None else ''}")
            print(f"kvstore demo --daemon: daemon pid {daemon.pid} on {address}, L2 = {args.host_pages} "
                  f"pages; two engine processes, reference decoder '{args.preset}'\n")
            rows = []
            for role in ("A", "B"):
                cmd = [sys.executable, "-m", "decoder.daemon_demo", address, role, args.preset,
                       str(args.page_size), str(args.system_prompt), str(args.new_tokens)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    return 1
                rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        finally:
            daemon.terminate()
            daemon.wait(60)
    _print(rows)
    return 0 if all(r["identical"] for r in rows) and rows[-1]["from_daemon"] > 0 else 1


def _print(rows: list[dict]) -> None:
    head = (f"{'engine':>6} {'pid':>7} {'prompt':>7} {'from daemon':>11} {'computed':>8} "
            f"{'TTFT cache':>11} {'TTFT no cache':>13}  same output")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['engine']:>6} {r['pid']:>7} {r['prompt']:>7} {r['from_daemon']:>11} {r['computed']:>8} "
              f"{r['ttft_cache_ms']:>8.1f} ms {r['ttft_plain_ms']:>10.1f} ms  "
              f"{'yes' if r['identical'] else 'NO'}")
    b = [r for r in rows if r["engine"] == "B"]
    print(f"\nengine B loaded {sum(r['from_daemon'] for r in b)} prompt tokens of KV that engine A "
          f"computed (shared system prompt, then A's whole conversation)")
    print("tokens and logits with the cache equal those without it, bit for bit: "
          + ("yes" if all(r["identical"] for r in rows) else "NO"))


if __name__ == "__main__":
    sys.exit(engine_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                         int(sys.argv[6])))
