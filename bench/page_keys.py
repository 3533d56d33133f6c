"""Time to compute the page keys of a long prompt (chained BLAKE2b over 16-token pages).

    python bench/page_keys.py [--tokens 100000] [--page-size 16] [--out bench/results/page_keys.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, page_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "page_keys.json"))
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores",
                        help="label of the machine in the results")
    args = parser.parse_args()
    layout = KVLayout(32, 8, 128, args.page_size, "bfloat16")
    digest = KeyNamespace("bench-model", layout).digest()
    tokens = np.random.default_rng(0).integers(0, 128_000, args.tokens)
    page_keys(digest, tokens, args.page_size)  # warm up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        page_keys(digest, tokens, args.page_size)
        times.append(time.perf_counter() - start)
    result = {
        "bench": "page_keys",
        "machine": args.machine,
        "python": platform.python_version(),
        "tokens": args.tokens,
        "page_size": args.page_size,
        "pages": args.tokens // args.page_size,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
