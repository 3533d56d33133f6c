"""Engine processes for the fencing tests: ``python fence_worker.py ADDRESS ROLE ARGS``.

Every page's KV is a function of its page key (``page_values``), so any process can
check any page it loads, byte for byte, whoever stored it.

    churn SEED SECONDS OTHER...  store fresh 8-page prompts as fast as it can (every
                             store evicts, so slots are reused all the time), loading and
                             checking earlier ones, until the file STOP exists; then look
                             up every prompt it stored and prompt(OTHER) of each, and check
    reader SEED POINT        store a prompt, look it up, stop itself (SIGSTOP) at POINT
                             (before_copy | mid_load | before_verify), then finish the load
    writer SEED POINT        store a prompt, stopping itself at POINT (before_copy |
                             mid_copy | before_commit) or copying slowly (slow_copy: 2 s,
                             heartbeats go on)

Prints ``PID <pid as this host sees it>`` first, then one JSON line: the outcome
(ok, load_error, not_published), pages checked and wrong bytes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from daemon_proc import LAYOUT, NAMESPACE  # noqa: E402

from controller.api import LoadError  # noqa: E402
from controller.client import DaemonClient  # noqa: E402
from controller.device_pool import DevicePool, SaveCopy  # noqa: E402
from kvstore.page_keys import page_keys  # noqa: E402

P = LAYOUT.page_size
NUM_PAGES = 8
PAGE_SHAPE = (LAYOUT.num_layers, 2, P, LAYOUT.num_kv_heads, LAYOUT.head_dim)


def prompt(seed: int) -> list[int]:
    return random.Random(seed).choices(range(50_000), k=NUM_PAGES * P)


def page_values(key: bytes) -> torch.Tensor:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return torch.from_numpy(rng.standard_normal(PAGE_SHAPE, dtype=np.float32))


def fill(pool: torch.Tensor, tokens: list[int], pages: list[int]) -> None:
    """Write the KV of ``tokens``' pages into device ``pages`` (layer_first pool)."""
    for key, page in zip(page_keys(NAMESPACE.digest(), tokens, P), pages):
        pool[:, :, page] = page_values(key)


def wrong_bytes(pool: torch.Tensor, keys, pages: list[int]) -> int:
    wrong = 0
    for key, page in zip(keys, pages):
        got = pool[:, :, page].contiguous().view(torch.uint8)
        want = page_values(key).view(torch.uint8)
        wrong += int((got != want).sum())
    return wrong


def stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def outer_pid() -> int:
    """This process's pid as the parent's pid namespace sees it (/proc is the host's)."""
    return int(os.readlink("/proc/self"))


def load_and_check(cache: DaemonClient, pool: torch.Tensor, tokens: list[int], pages: list[int],
                   pause_at: str | None = None, result=None) -> dict:
    result = result or cache.lookup(tokens)
    if pause_at == "before_copy":
        stop_here()
    try:
        handle = cache.load(result, pages[:result.num_hit_pages])
        handle.wait_layer(0)
        if pause_at == "mid_load":
            stop_here()
        handle.wait_all()
        if pause_at == "before_verify":
            stop_here()
        handle.verify()
    except LoadError as err:
        cache.release(result)
        return {"outcome": "load_error", "bad_pages": list(err.bad_pages), "pages": 0, "wrong": 0}
    wrong = wrong_bytes(pool, result.keys, pages)
    cache.release(result)
    return {"outcome": "ok", "pages": result.num_hit_pages, "wrong": wrong}


def churn(cache: DaemonClient, pool: torch.Tensor, seed: int, seconds: float,
          others: list[int]) -> dict:
    end, stored = time.monotonic() + seconds, []
    totals = {"stores": 0, "pages": 0, "wrong": 0, "load_errors": 0}
    while time.monotonic() < end and not os.path.exists("STOP"):
        tokens = prompt(seed * 1_000_000 + len(stored))
        fill(pool, tokens, list(range(NUM_PAGES)))
        cache.store(tokens, list(range(NUM_PAGES)))
        stored.append(tokens)
        if len(stored) % 3 == 0:
            _count(totals, load_and_check(cache, pool, stored[-2], list(range(NUM_PAGES, 2 * NUM_PAGES))))
    totals["stores"] = len(stored)
    sweep = {"pages": 0, "wrong": 0, "load_errors": 0}
    for tokens in stored + [prompt(other) for other in others]:
        _count(sweep, load_and_check(cache, pool, tokens, list(range(NUM_PAGES, 2 * NUM_PAGES))))
    totals["sweep"] = sweep
    return totals


def _count(totals: dict, got: dict) -> None:
    totals["pages"] += got["pages"]
    totals["wrong"] += got["wrong"]
    totals["load_errors"] += got["outcome"] == "load_error"


def _pausing_save(point: str):
    """DevicePool.start_save (CPU) that stops this process, or dawdles, at ``point`` of the
    copy: the same plan, launched a layer at a time."""

    def start_save(self, pages, host, slots):
        if point == "before_copy":
            stop_here()
        plan = self._copy.plan_layers(self.tensor, self.layout, pages, host.tensor, host.layout,
                                      list(slots))
        for layer in range(plan.num_layers):
            plan.launch(layer)
            if layer == 0 and point == "mid_copy":
                stop_here()
            if point == "slow_copy":
                time.sleep(2.0 / plan.num_layers)
        if point == "before_commit":
            stop_here()
        return SaveCopy(None)
    return start_save


def main(address: str, role: str, *args: str) -> int:
    print(f"PID {outer_pid()}", flush=True)
    pool = torch.zeros(LAYOUT.pool_shape(4 * NUM_PAGES))
    cache = DaemonClient(address, NAMESPACE, pool, client_name=f"{role}-{os.getpid()}")
    pages = list(range(NUM_PAGES))
    try:
        if role == "churn":
            out = churn(cache, pool, int(args[0]), float(args[1]), [int(a) for a in args[2:]])
        elif role == "reader":
            tokens = prompt(int(args[0]))
            fill(pool, tokens, pages)
            for _ in range(50):   # the churn may evict it between store and lookup
                cache.store(tokens, pages)
                result = cache.lookup(tokens)
                if result.num_hit_pages == NUM_PAGES:
                    break
                cache.release(result)
            out = load_and_check(cache, pool, tokens, list(range(NUM_PAGES, 2 * NUM_PAGES)), args[1],
                                 result)
        elif role == "writer":
            tokens = prompt(int(args[0]))
            fill(pool, tokens, pages)
            DevicePool.start_save = _pausing_save(args[1])
            stored = cache.store(tokens, pages)
            out = {"outcome": "ok" if stored.num_new_pages else "not_published",
                   "new_pages": stored.num_new_pages}
            got = load_and_check(cache, pool, tokens, list(range(NUM_PAGES, 2 * NUM_PAGES)))
            out.update(pages=got["pages"], wrong=got["wrong"])
        else:
            raise SystemExit(f"unknown role {role!r}")
    finally:
        cache.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
