"""Time to compute the page keys of a long prompt (chained BLAKE2b over 16-token pages).

    python bench/page_keys.py [--pages 8192] [--new-pages 64] [--page-size 16] [--out ...]

Four ways to key one prompt of ``--pages`` pages, measured in the same run:

- ``hashlib``: the reference loop (one ``hashlib.blake2b`` call per page), the
  baseline every ratio is against;
- ``cold``: ``page_keys`` as the service calls it (the C chain where built);
- ``next_turn``: a ``PageKeyCache`` that holds the previous turn, the same
  prompt less its last ``--new-pages`` pages: only those are hashed;
- ``repeat``: the same prompt again: nothing is hashed.

Every timed call's keys are checked against the reference, and the cache's
count of hashed pages against what the case claims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kvstore.key_chain import load_key_chain
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, PageKeyCache, hash_chain_reference, page_keys


# (keys, (wall, CPU) seconds of the timed part). CPU time as well: on a machine shared
# with other work the wall time measures the queue for a core as much as the code.
Timed = Callable[[], tuple[list[bytes], tuple[float, float]]]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _timed(fn: Callable[[], list[bytes]]) -> Timed:
    def run() -> tuple[list[bytes], tuple[float, float]]:
        start = _clock()
        keys = fn()
        return keys, _since(start)
    return run


def _cached(digest: bytes, previous: np.ndarray, tokens: np.ndarray, page_size: int,
            num_new: int) -> Timed:
    """A fresh cache that has seen ``previous`` keys ``tokens`` (timed); it must hash ``num_new``."""
    def run() -> tuple[list[bytes], tuple[float, float]]:
        cache = PageKeyCache(page_size)
        cache.keys(digest, previous)
        before = cache.num_hashed_pages
        start = _clock()
        keys = cache.keys(digest, tokens)
        elapsed = _since(start)
        if cache.num_hashed_pages - before != num_new:
            raise AssertionError(f"hashed {cache.num_hashed_pages - before} pages, expected {num_new}")
        return keys, elapsed
    return run


def _median_ms(fn: Timed, expect: list[bytes], repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) milliseconds of ``repeats`` calls, each checked against ``expect``."""
    walls, cpus = [], []
    for _ in range(repeats):
        keys, (wall, cpu) = fn()
        if keys != expect:
            raise AssertionError("keys differ from the reference loop's")
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def measure(num_pages: int, num_new: int, page_size: int, repeats: int) -> dict:
    layout = KVLayout(32, 8, 128, page_size, "bfloat16")
    digest = KeyNamespace("bench-model", layout).digest()
    tokens = np.random.default_rng(0).integers(0, 128_000, num_pages * page_size)
    previous = tokens[: (num_pages - num_new) * page_size]
    expect = hash_chain_reference(digest, tokens.astype("<i4").tobytes(), page_size * 4)
    cases: dict[str, Timed] = {
        "hashlib": _timed(lambda: hash_chain_reference(
            digest, tokens.astype("<i4").tobytes(), page_size * 4)),
        "cold": _timed(lambda: page_keys(digest, tokens, page_size)),
        "next_turn": _cached(digest, previous, tokens, page_size, num_new),
        "repeat": _cached(digest, tokens, tokens, page_size, 0),
    }
    both = {name: _median_ms(fn, expect, repeats) for name, fn in cases.items()}
    ms, cpu = {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}
    return {"pages": num_pages, "new_pages": num_new, "median_ms": ms, "median_cpu_ms": cpu,
            "cpu_us_per_page": {k: cpu[k] * 1e3 / num_pages for k in ("hashlib", "cold")},
            "speedup_vs_hashlib": {k: ms["hashlib"] / v for k, v in ms.items() if k != "hashlib"},
            "cpu_speedup_vs_hashlib": {k: cpu["hashlib"] / v for k, v in cpu.items() if k != "hashlib"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[128, 2048, 8192])
    parser.add_argument("--new-pages", type=int, default=64, help="pages a next turn adds")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "page_keys.json"))
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores",
                        help="label of the machine in the results")
    args = parser.parse_args()
    result = {
        "bench": "page_keys",
        "machine": args.machine,
        "python": platform.python_version(),
        "page_size": args.page_size,
        "c_chain": load_key_chain() is not None,
        "load_avg_at_start": os.getloadavg(),  # other work on the machine skews every figure
        "results": [measure(n, min(args.new_pages, n), args.page_size, args.repeats)
                    for n in args.pages],
    }
    result["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
