"""An engine process for the daemon tests: ``python daemon_worker.py ADDRESS MODE [ARGS]``.

    store SEED N        store N pages of tokens(SEED) from a device pool seeded with SEED
    hold SEED N         store, then hold a lease and an uncommitted reservation; print READY; sleep
    stress SECONDS ID   random lookup / load / store / release on a shared set of prompts
Prints one JSON line with what it did; exits non-zero on any unexpected error.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_proc import LAYOUT, NAMESPACE, device_pool  # noqa: E402

from controller.api import CacheError  # noqa: E402
from controller.client import DaemonClient  # noqa: E402
from controller.daemon import protocol as p  # noqa: E402

P = LAYOUT.page_size


def tokens(seed: int, num_pages: int) -> list[int]:
    return random.Random(seed).choices(range(1000), k=num_pages * P)


def main(address: str, mode: str, *args: str) -> int:
    if mode == "stress":
        return stress(address, float(args[0]), int(args[1]))
    seed, n = int(args[0]), int(args[1])
    pool = device_pool(max(n, 8) + 8, seed=seed)
    cache = DaemonClient(address, NAMESPACE, pool)
    result = cache.store(tokens(seed, n), list(range(n)))
    if mode == "store":
        print(json.dumps({"num_new_pages": result.num_new_pages}), flush=True)
        cache.close()
        return 0
    # hold: a lease and an open reservation, then die by kill -9
    held = cache.lookup(tokens(seed, n))
    other = [bytes([i]) * 16 for i in range(1, 4)]
    plan = cache._link.session.call(p.BeginStore(p.join_keys(other)))
    print(json.dumps({"lease": held.lease_id, "reservation": plan.reservation_id}), flush=True)
    print("READY", flush=True)
    time.sleep(300)
    return 1


def stress(address: str, seconds: float, worker_id: int) -> int:
    rng = random.Random(worker_id)
    pool = device_pool(256, seed=worker_id)
    cache = DaemonClient(address, NAMESPACE, pool, client_name=f"stress-{worker_id}")
    prompts = [tokens(s, rng.randint(1, 24)) for s in range(40)]  # shared by every worker
    held = []
    counts = {"lookup": 0, "store": 0, "release": 0, "load": 0, "hit_pages": 0, "errors": 0}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        op = rng.random()
        prompt = rng.choice(prompts)
        if op < 0.45:
            result = cache.lookup(prompt)
            counts["lookup"] += 1
            counts["hit_pages"] += result.num_hit_pages
            if result.num_hit_pages and rng.random() < 0.5:
                cache.load(result, list(range(result.num_hit_pages))).wait_all()
                counts["load"] += 1
            held.append(result)
        elif op < 0.75:
            cache.store(prompt, list(range(100, 100 + len(prompt) // P)))
            counts["store"] += 1
        elif held:
            cache.release(held.pop(rng.randrange(len(held))))
            counts["release"] += 1
        if len(held) > 8:
            cache.release(held.pop(0))
            counts["release"] += 1
    for result in held:
        cache.release(result)
    counts["timeouts"] = cache._link.session.channel.num_timeouts
    cache.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(*sys.argv[1:]))
    except CacheError as exc:
        print(f"CacheError: {exc}", file=sys.stderr)
        sys.exit(2)
