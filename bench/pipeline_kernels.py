"""Pipeline benchmark: a layer-wise load and an asynchronous store through DevicePool.

Llama-3-8B shapes (32 layers, 8 KV heads, head dim 128, bf16), 128 pages of 16 and of 64
tokens, the engine's pool layer_first, the shm HostPool page_first, random page ids on
both sides. Per copy-path variant:

- load: ``DevicePool.load`` then ``wait_layer(i)`` for every layer, an event recorded on the
  engine's stream after each wait: when layer i became readable. 'hidden' runs start
  behind a GPU sleep on the engine's stream (the host plans and issues meanwhile), so the
  clock starts when the stream reaches the load: the copy pipeline alone. 'cold' runs
  start on an idle GPU and the clock at the call: planning and issue included;
- against a contiguous pinned memcpy of the same bytes (H2D for loads, D2H for stores):
  completion <= memcpy / 0.9, layer i ready <= (i+1)/32 * memcpy + 50 us;
- host time of ``DevicePool.load()`` / ``start_save()`` and of the embedded controller's
  ``load()`` / ``store()`` (page keys, index and slots included);
- the old way for reference: 32 ``copy_pages(layer=i)`` calls on the engine thread.

    python bench/pipeline_kernels.py --out bench/results/pipeline_kernels_h200.json
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

from controller.config import ControllerConfig  # noqa: E402
from controller.device_pool import DevicePool  # noqa: E402
from controller.embedded import EmbeddedController  # noqa: E402
from kvstore.copy_cuda import CudaCopyBackend  # noqa: E402
from kvstore.copy_ops import CudaPathPolicy  # noqa: E402
from kvstore.host_pool import HostPool  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402
from kvstore.page_keys import KeyNamespace  # noqa: E402

GB = 1e9
SLACK_MS = 0.05
VARIANTS = {
    "default": CudaPathPolicy(),
    "sm4": CudaPathPolicy(plan_path="sm", plan_sm_blocks=4),
    "sm8": CudaPathPolicy(plan_path="sm", plan_sm_blocks=8),
    "sm16": CudaPathPolicy(plan_path="sm", plan_sm_blocks=16),
    "sm32": CudaPathPolicy(plan_path="sm", plan_sm_blocks=32),
    "dma": CudaPathPolicy(plan_path="dma"),
}


def sleep_ms(ms: float) -> None:
    torch.cuda._sleep(int(ms * 1e-3 * 1.98e9))  # ~ the H200's SM clock under load


def memcpy_ms(dst: torch.Tensor, src: torch.Tensor, reps: int = 7) -> float:
    stream = torch.cuda.current_stream()
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        dst.copy_(src, non_blocking=True)
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[2:])


def timed_load(pool: DevicePool, host: HostPool, slots, pages, hide_ms: float) -> dict:
    """One load, waited layer by layer; ready times (ms) from the clock's start."""
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    if hide_ms:
        sleep_ms(hide_ms)
    start = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    t0 = time.perf_counter()
    handle = pool.load(host, slots, pages)
    host_ms = (time.perf_counter() - t0) * 1e3
    ready = []
    for layer in range(pool.layout.num_layers):
        handle.wait_layer(layer)
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        ready.append(event)
    wait_host_ms = (time.perf_counter() - t0) * 1e3 - host_ms
    torch.cuda.synchronize()
    handle.finish()
    # Cold: the GPU is idle, so the start event completes at once: the clock starts at the call.
    times = [start.elapsed_time(e) for e in ready]
    return {"host_ms": host_ms, "wait_host_ms": wait_host_ms, "ready_ms": times}


def load_rows(P: int, variant: str, pool: DevicePool, host: HostPool, slots, pages, ref_ms: float,
              reps: int) -> list[dict]:
    rows = []
    num_layers = pool.layout.num_layers
    for mode, hide in (("hidden", 10.0 + ref_ms * 2), ("cold", 0.0)):
        runs = [timed_load(pool, host, slots, pages, hide) for _ in range(reps)]
        ready = [statistics.median(r["ready_ms"][i] for r in runs) for i in range(num_layers)]
        bound = [(i + 1) / num_layers * ref_ms + SLACK_MS for i in range(num_layers)]
        rows.append({
            "page_size": P, "op": "load", "variant": variant, "mode": mode, "path": _plan_path(pool, host, slots, pages),
            "memcpy_ms": round(ref_ms, 4), "complete_ms": round(ready[-1], 4),
            "frac_memcpy": round(ref_ms / ready[-1], 4), "complete_ok": ready[-1] <= ref_ms / 0.9,
            "worst_layer_slack_ms": round(min(b - r for b, r in zip(bound, ready)), 4),
            "layers_ok": all(r <= b for r, b in zip(ready, bound)),
            "ready_ms": [round(r, 4) for r in ready],
            "host_load_ms": round(statistics.median(r["host_ms"] for r in runs), 4),
            "host_wait_all_ms": round(statistics.median(r["wait_host_ms"] for r in runs), 4),
        })
    return rows


def _plan_path(pool: DevicePool, host: HostPool, slots, pages) -> str:
    plan = pool._copy.plan_layers(host.tensor, host.layout, slots, pool.tensor, pool.layout, pages)
    return getattr(plan, "path", "loop")


def store_row(P: int, variant: str, pool: DevicePool, host: HostPool, slots, pages, ref_ms: float,
              reps: int) -> dict:
    host_ms, dev_ms = [], []
    stream = torch.cuda.current_stream()
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        sleep_ms(5.0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        copy = pool.start_save(pages, host, slots)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        end.record(stream)  # the engine's stream waits for the copy: this marks its end
        copy.wait()
        end.synchronize()
        dev_ms.append(start.elapsed_time(end))
    ms = statistics.median(dev_ms[1:])
    return {"page_size": P, "op": "store", "variant": variant, "memcpy_ms": round(ref_ms, 4),
            "complete_ms": round(ms, 4), "frac_memcpy": round(ref_ms / ms, 4),
            "host_start_save_ms": round(statistics.median(host_ms[1:]), 4)}


def old_way_row(P: int, pool: DevicePool, host: HostPool, slots, pages) -> dict:
    """32 ``copy_pages(layer=i)`` on the engine thread (what load() did before plans)."""
    backend = pool._copy
    host_ms = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(pool.layout.num_layers):
            backend.copy_pages(host.tensor, host.layout, slots, pool.tensor, pool.layout, pages, layer=layer)
        host_ms.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return {"page_size": P, "op": "load_old_per_layer_copy_pages", "host_issue_ms": round(statistics.median(host_ms), 4)}


def controller_row(P: int, layout: KVLayout, dev: torch.Tensor, n: int, reps: int) -> dict:
    """Host time of the embedded controller's store() and load() (keys, index, slots, plan)."""
    config = ControllerConfig(host_pool_pages=n + 8)  # older pages are evicted
    ctl = EmbeddedController(config, KeyNamespace("bench-model", layout), dev)
    store_ms, load_ms = [], []
    pages = list(range(n))
    for rep in range(reps + 1):
        tokens = list(range(rep * 10**6, rep * 10**6 + n * P))
        torch.cuda.synchronize()
        sleep_ms(5.0)
        t0 = time.perf_counter()
        ctl.store(tokens, pages)
        store_ms.append((time.perf_counter() - t0) * 1e3)
        ctl.check_integrity(quiescent=True)  # waits for the copy, publishes it
        result = ctl.lookup(tokens)
        assert result.num_hit_pages == n, result
        torch.cuda.synchronize()
        sleep_ms(5.0)
        t0 = time.perf_counter()
        handle = ctl.load(result, list(range(n, 2 * n)))
        load_ms.append((time.perf_counter() - t0) * 1e3)
        handle.wait_all()
        ctl.release(result)
    torch.cuda.synchronize()
    ctl.close()
    return {"page_size": P, "op": "embedded_controller", "num_pages": n,
            "host_store_ms": round(statistics.median(store_ms[1:]), 4),
            "host_load_ms": round(statistics.median(load_ms[1:]), 4)}


def bench_page_size(P: int, n: int, args, out: dict) -> None:
    layout = KVLayout(32, 8, 128, P)
    dev = torch.randn(layout.pool_shape(2 * n), device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(P)
    pages = torch.randperm(2 * n, generator=gen)[:n].tolist()
    with HostPool(layout, num_slots=n) as host:
        host.tensor.reshape(-1).view(torch.uint8)[:] = 7
        slots = torch.randperm(n, generator=gen).tolist()
        nbytes = n * layout.page_bytes
        dev_flat, host_flat = dev.reshape(-1).view(torch.uint8)[:nbytes], host.tensor.reshape(-1).view(torch.uint8)
        h2d, d2h = memcpy_ms(dev_flat, host_flat), memcpy_ms(host_flat, dev_flat)
        out["memcpy"].append({"page_size": P, "bytes": nbytes, "h2d_ms": round(h2d, 4), "d2h_ms": round(d2h, 4),
                              "h2d_gbps": round(nbytes / h2d / 1e6, 2), "d2h_gbps": round(nbytes / d2h / 1e6, 2)})
        for variant in args.variants:
            pool = DevicePool(layout, dev, CudaCopyBackend(VARIANTS[variant]))
            timed_load(pool, host, slots, pages, 0.0)  # warm-up: library, streams, issuer thread
            for row in load_rows(P, variant, pool, host, slots, pages, h2d, args.reps):
                emit(out, row)
            emit(out, store_row(P, variant, pool, host, slots, pages, d2h, args.reps))
            if variant == "default":
                emit(out, old_way_row(P, pool, host, slots, pages))
            pool.close()
    emit(out, controller_row(P, layout, dev, n, args.reps))
    del dev
    torch.cuda.empty_cache()


def emit(out: dict, row: dict) -> None:
    out["results"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "ready_ms"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_kernels.json"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pages", type=int, default=128)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    import cuda_ops

    props = torch.cuda.get_device_properties(0)
    out = {
        "device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "cuda_runtime": cuda_ops.runtime_version(), "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "32 layers, 8 kv heads, head dim 128, bf16; device layer_first, host page_first (shm HostPool)",
        "targets": "load complete <= memcpy/0.9; layer i ready <= (i+1)/32*memcpy + 50us; "
                   "host load() <= 1 ms; host store() <= 0.3 ms",
        "variants": {k: v.__dict__ for k, v in VARIANTS.items()}, "memcpy": [], "results": [],
    }
    for P in (16, 64):
        bench_page_size(P, args.pages, args, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print_table(out)


def print_table(out: dict) -> None:
    print(f"\n{out['device']}  torch {out['torch']}  cudart {out['cuda_runtime']}")
    for m in out["memcpy"]:
        print(f"P={m['page_size']} memcpy {m['bytes'] / 2**20:.0f} MiB: h2d {m['h2d_ms']} ms ({m['h2d_gbps']} GB/s), "
              f"d2h {m['d2h_ms']} ms ({m['d2h_gbps']} GB/s)")
    print(f"{'P':>3} {'op':>6} {'variant':>8} {'mode':>6} {'path':>5} {'ms':>8} {'x memcpy':>8} {'ok':>3} "
          f"{'slack ms':>8} {'lay ok':>6} {'host ms':>8}")
    for r in out["results"]:
        if r["op"] == "load":
            print(f"{r['page_size']:>3} {'load':>6} {r['variant']:>8} {r['mode']:>6} {str(r['path']):>5} "
                  f"{r['complete_ms']:8.3f} {r['frac_memcpy']:8.3f} {'y' if r['complete_ok'] else 'n':>3} "
                  f"{r['worst_layer_slack_ms']:8.3f} {'y' if r['layers_ok'] else 'n':>6} {r['host_load_ms']:8.3f}")
        elif r["op"] == "store":
            print(f"{r['page_size']:>3} {'store':>6} {r['variant']:>8} {'':>6} {'':>5} {r['complete_ms']:8.3f} "
                  f"{r['frac_memcpy']:8.3f} {'':>3} {'':>8} {'':>6} {r['host_start_save_ms']:8.3f}")
        else:
            print(f"{r['page_size']:>3} {json.dumps({k: v for k, v in r.items() if k != 'page_size'})}")


if __name__ == "__main__":
    main()
