"""What slot fencing costs on the load path: a 32-layer load with and without its fence.

Llama-3-8B shapes (32 layers, 8 KV heads, head dim 128, bf16), 128 pages of 16 tokens,
the engine's pool layer_first, the shm HostPool page_first, random page ids. One
timed load is ``DevicePool.load`` + ``wait_layer`` of every layer (the engine's waits),
then, for the fenced load, ``verify()`` (the generation check after the copies); the
clock stops when the engine's stream has passed the last layer (CUDA: host
synchronised). Fenced and unfenced loads alternate, so both see the same machine; the
contiguous memcpy of the same bytes (pinned, H2D) is measured in the same run.

    python bench/fence_cost.py --out bench/results/fence_cost_h200.json      # on the GPU host
    python bench/fence_cost.py --device cpu --pages 32 --out bench/results/fence_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.device_pool import DevicePool  # noqa: E402
from kvstore.host_pool import HostPool  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402
from kvstore.slot_fence import SlotFence  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_load(pool: DevicePool, host: HostPool, slots: list[int], pages: list[int],
             fenced: bool) -> float:
    device = pool.tensor.device
    sync(device)
    start = time.perf_counter()
    fence = SlotFence.current(host.generations, slots) if fenced else None
    handle = pool.load(host, slots, pages, fence)
    for layer in range(pool.layout.num_layers):
        handle.wait_layer(layer)
    if fenced:
        handle.verify()
    sync(device)
    elapsed = time.perf_counter() - start
    handle.finish()
    return elapsed


def memcpy_s(host: HostPool, pool: DevicePool, num_bytes: int, reps: int) -> float:
    device = pool.tensor.device
    src = host.tensor.view(-1).view(torch.uint8)[:num_bytes]
    dst = pool.tensor.view(-1).view(torch.uint8)[:num_bytes]
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, page_size=args.page_size,
                      dtype="bfloat16")
    n = args.pages
    host = HostPool(layout, num_slots=2 * n, pin=device.type == "cuda")
    pool = DevicePool(layout, torch.zeros(layout.pool_shape(2 * n), dtype=layout.torch_dtype,
                                          device=device), None)
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(2 * n, generator=gen)[:n].tolist()
    pages = torch.randperm(2 * n, generator=gen)[:n].tolist()
    for _ in range(3):  # warm up both paths
        one_load(pool, host, slots, pages, False)
        one_load(pool, host, slots, pages, True)
    plain, fenced = [], []
    for _ in range(args.reps):
        plain.append(one_load(pool, host, slots, pages, False))
        fenced.append(one_load(pool, host, slots, pages, True))
    num_bytes = n * layout.page_bytes
    ref = memcpy_s(host, pool, num_bytes, max(7, args.reps // 5))
    p50_plain, p50_fenced = statistics.median(plain), statistics.median(fenced)
    out = {
        "machine": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "pages": n, "page_size": args.page_size, "bytes": num_bytes, "reps": args.reps,
        "load_ms_p50": p50_plain * 1e3,
        "fenced_load_ms_p50": p50_fenced * 1e3,
        "fence_overhead_fraction": p50_fenced / p50_plain - 1,
        "fence_target": "at most 0.02 of a 32-layer load",
        "memcpy_ms": ref * 1e3,
        "load_vs_memcpy": ref / p50_plain,
        "fenced_load_vs_memcpy": ref / p50_fenced,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    host.close()


if __name__ == "__main__":
    main()
