"""Index bench: lookup + release of an all-L2 prefix, and a store of 128 new pages.

    python bench/index.py [--pages 128,512,2048,8192,32768] [--out bench/results/index.json]

Through an EmbeddedController (CPU pool, 16-token pages, the default eviction
policy), for each prompt length, p50 over repeats:

- ``total_ms``: ``lookup(tokens)`` + ``release`` through the public API;
- ``hashing_ms``: ``page_keys`` of the same tokens (the key chain alone);
- ``index_ms``: ``CacheCore.lookup(keys)`` + ``release`` with the keys given
  (what the index, the policy and the pool's lease counts cost);
- ``pool_ms``: of that, ``HostPool.lease`` + ``unlease`` of the same slots;
- ``store128_ms``: ``begin_store`` + ``commit_store`` of 128 new pages (host
  work only, no copy), with the tier full so that 128 pages are evicted.

Every lookup asserts that all its pages hit L2 and every store that it
published 128 pages: a miss is not a hit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from controller.config import ControllerConfig
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, page_keys

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, page_size=16, dtype="float16")
STORE_PAGES = 128


def p50_ms(fn, reps: int, best: dict | None = None, name: str = "") -> float:
    """p50 of ``reps`` calls in ms; the fastest goes to ``best[name]`` (a shared box's
    other load shows in the median, less in the minimum)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if best is not None:
        best[name] = 1e3 * min(times)
    return 1e3 * statistics.median(times)


def measure(num_pages: int, reps: int, seed: int = 0) -> dict:
    """One prompt of ``num_pages`` pages stored, then timed as the module docstring says."""
    ns = KeyNamespace("bench-index", LAYOUT)
    config = ControllerConfig(host_pool_pages=num_pages + 4 * STORE_PAGES)
    device = torch.zeros(LAYOUT.pool_shape(num_pages), dtype=LAYOUT.torch_dtype)
    cache = EmbeddedController(config, ns, device)
    try:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, 32000, num_pages * LAYOUT.page_size)
        assert cache.store(tokens, list(range(num_pages))).num_new_pages == num_pages
        core, digest = cache._core, ns.digest()
        keys = page_keys(digest, tokens, LAYOUT.page_size)

        def api_lookup_release() -> None:
            result = cache.lookup(tokens)
            assert result.num_l2_pages == num_pages, "a miss is not a hit"
            cache.release(result)

        def index_lookup_release() -> None:
            hit = core.lookup(keys)
            assert hit.num_l2 == num_pages, "a miss is not a hit"
            core.release(keys)

        slots = core.slots_of(keys)

        def pool_lease_unlease() -> None:
            core.pool.lease(slots)
            core.pool.unlease(slots)

        best: dict[str, float] = {}
        row = {"pages": num_pages, "tokens": num_pages * LAYOUT.page_size,
               "total_ms": p50_ms(api_lookup_release, reps, best, "total_min_ms"),
               "hashing_ms": p50_ms(lambda: page_keys(digest, tokens, LAYOUT.page_size), reps),
               "index_ms": p50_ms(index_lookup_release, reps, best, "index_min_ms"),
               "pool_ms": p50_ms(pool_lease_unlease, reps, best, "pool_min_ms")}
        row["store128_ms"] = store_p50(core, digest, rng, max(reps, 20), best)
        core.check_integrity(quiescent=True)
        return {**row, **best}
    finally:
        cache.close()


def store_p50(core, digest: bytes, rng: np.random.Generator, reps: int, best: dict) -> float:
    """begin_store + commit_store of 128 new pages each time (the tier fills, then evicts)."""
    prompts = [page_keys(digest, rng.integers(0, 32000, STORE_PAGES * LAYOUT.page_size),
                         LAYOUT.page_size) for _ in range(reps + 8)]
    for keys in prompts[:8]:  # fill the tier's spare room: the timed stores evict
        core.commit_store(keys, core.begin_store(keys))
    times = []
    for keys in prompts[8:]:
        start = time.perf_counter()
        plan = core.begin_store(keys)
        published = core.commit_store(keys, plan)
        times.append(time.perf_counter() - start)
        assert published == STORE_PAGES, f"stored {published} of {STORE_PAGES} new pages"
    best["store128_min_ms"] = 1e3 * min(times)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default="128,512,2048,8192,32768")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "index.json")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    rows = []
    for n in (int(p) for p in args.pages.split(",")):
        gc.collect()
        row = measure(n, reps=max(5, min(60, 8192 * 8 // n)))
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    doc = {"bench": "index", "label": args.label, "host": platform.node(), "cpus": os.cpu_count(),
           "page_size": LAYOUT.page_size, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
