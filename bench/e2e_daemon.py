"""The daemon side of bench/e2e.py: a `kvstore serve` started for the run, and the decode
side of the prefill -> decode hand-off as a process of its own.

    with spawned_daemon(layout, host_pages, workdir) as address:
        cache = controller.connect_daemon(address, namespace, engine.kv_pool)

The hand-off child (``python bench/e2e_daemon.py SPEC.json``) builds the same model
(same preset and seed, weights drawn on its device), attaches to the daemon, runs the
prompt with ``decode_steps`` new tokens and prints one JSON line with what it measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvstore.layout import KVLayout  # noqa: E402

_START_TIMEOUT_S = 120.0   # a large host pool takes a while to create


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@contextlib.contextmanager
def spawned_daemon(layout: KVLayout, host_pages: int, workdir: Path) -> Iterator[str]:
    """A daemon for ``layout`` with ``host_pages`` pages of L2, stopped (SIGTERM) on exit."""
    from controller.daemon.launch import serve_command, wait_until_serving

    workdir.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{workdir / 'kvstore.sock'}"
    log = open(workdir / "daemon.log", "ab")
    # Prefault: the host pool's memory is touched at start, outside every timing.
    serve = serve_command(address, layout, host_pages, extra=["--prefault-host-pool", "true"])
    proc = subprocess.Popen(serve, env=_env(), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(address, proc, _START_TIMEOUT_S)
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def run_decode_child(spec: dict, workdir: Path, timeout_s: float = 600.0) -> dict:
    """Run the hand-off's decode side in a new process; its JSON result. The spec (prompts
    of tens of thousands of tokens) goes through a file: too long for a command line."""
    spec_path = workdir / "handoff_spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_path)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"hand-off decode process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _decode_side(spec: dict) -> dict:
    """The child: same model, attach to the daemon, load the prompt's KV, decode."""
    import torch

    import controller
    from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine
    from kvstore.page_keys import KeyNamespace

    device = torch.device(spec["device"])
    config = DecoderConfig.preset(spec["preset"], max_positions=spec["max_positions"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = ReferenceDecoder(config, device=device, dtype=dtype, attention="sdpa", draw_on="device")
    layout = config.kv_layout(spec["page_size"], dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    engine = ReferenceEngine(model, layout, spec["num_pages"], prefill_chunk_len=spec["chunk"])
    cache = controller.connect_daemon(spec["address"], KeyNamespace(config.model_id, layout), engine.kv_pool)
    try:
        engine.attach_cache(cache)
        engine.generate(spec["warmup_prompt"], 1)          # untimed: first launches, pinning
        out = engine.generate(spec["prompt"], spec["decode_steps"])
    finally:
        engine.attach_cache(None)
        cache.close()
    return {"decode_ttft_s": out.ttft_s, "decode_cached_tokens": out.num_cached_tokens,
            "decode_total_s": out.total_s, "num_decoded": len(out.tokens), "first_token": out.tokens[0],
            "bytes_loaded": out.num_cached_tokens // layout.page_size * layout.page_bytes}


if __name__ == "__main__":
    print(json.dumps(_decode_side(json.loads(Path(sys.argv[1]).read_text()))), flush=True)
