"""The daemon side of bench/e2e.py: a `kvstore serve` started for the run, and the decode
side of the prefill -> decode hand-off as a process of its own.

    with spawned_daemon(layout, host_pages, workdir) as address:
        cache = controller.connect_daemon(address, namespace, engine.kv_pool)

The hand-off child (``python bench/e2e_daemon.py '<json>'``) builds the same model
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
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.api import CacheError  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402

_START_TIMEOUT_S = 120.0   # a large host pool takes a while to create


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@contextlib.contextmanager
def spawned_daemon(layout: KVLayout, host_pages: int, workdir: Path) -> Iterator[str]:
    """A daemon for ``layout`` with ``host_pages`` pages of L2, stopped (SIGTERM) on exit."""
    from controller.client import Session

    workdir.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{workdir / 'kvstore.sock'}"
    cmd = [sys.executable, "-m", "controller.cli", "serve", "--address", address,
           "--host-pool-pages", str(host_pages), "--layout-num-layers", str(layout.num_layers),
           "--layout-num-kv-heads", str(layout.num_kv_heads), "--layout-head-dim", str(layout.head_dim),
           "--layout-page-size", str(layout.page_size), "--layout-dtype", layout.dtype]
    log = open(workdir / "daemon.log", "ab")
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited with {proc.returncode}: see {workdir / 'daemon.log'}")
            session = Session(address, request_timeout_s=0.5)
            try:
                session.ping()
                break
            except CacheError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvstore serve not ready after {_START_TIMEOUT_S} s") from None
                time.sleep(0.2)
            finally:
                session.close()
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


def run_decode_child(spec: dict, timeout_s: float = 600.0) -> dict:
    """Run the hand-off's decode side in a new process; its JSON result."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
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
    print(json.dumps(_decode_side(json.loads(sys.argv[1]))), flush=True)
