"""Daemon RPC bench: lookup in-process vs through the daemon, store, and N-client throughput.

    python bench/daemon.py --machine "2-core dev box" --out bench/results/daemon.json

Measures (16-token pages, every page in L2, keys hashed once up front: the client
hashes tokens in both modes, so hashing is reported apart):
- lookup of a 128- and a 2,048-page prefix: CacheCore.lookup + release in-process
  (index work only), and Lookup through the daemon (client send -> reply, release untimed);
- store of 128 new pages through DaemonClient.store (reserve + copy + commit, CPU copies);
- aggregate lookups/s and p99 with 1, 4 and 8 client processes (128-page lookups + release).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from controller.client import DaemonClient, Session  # noqa: E402
from controller.config import ControllerConfig  # noqa: E402
from controller.core import CacheCore  # noqa: E402
from controller.daemon import protocol as p  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402
from kvstore.page_keys import KeyNamespace, page_keys  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, page_size=16, dtype="bfloat16")
NAMESPACE = KeyNamespace("bench-model", LAYOUT)
POOL_PAGES = 8192


def pct(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_us": round(s[len(s) // 2] * 1e6, 1), "p99_us": round(s[int(len(s) * 0.99)] * 1e6, 1),
            "n": len(s)}


def prompt(seed: int, num_pages: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50000, num_pages * 16, dtype=np.int32)


def bench_in_process(iters: int) -> dict:
    core = CacheCore(ControllerConfig(host_pool_pages=POOL_PAGES), LAYOUT)
    out = {}
    try:
        for n in (128, 2048):
            keys = page_keys(NAMESPACE.digest(), prompt(n, n), 16)
            plan = core.begin_store(keys)
            core.commit_store(keys, plan)
            times, hashing = [], []
            for _ in range(iters):
                t0 = time.perf_counter()
                page_keys(NAMESPACE.digest(), prompt(n, n), 16)
                t1 = time.perf_counter()
                num_l2 = core.lookup(keys).num_l2
                t2 = time.perf_counter()
                core.release(keys[:num_l2])
                hashing.append(t1 - t0)
                times.append(t2 - t1)
            out[f"lookup_{n}"] = pct(times)
            out[f"key_hashing_{n}"] = pct(hashing)
    finally:
        core.close()
    return out


def start_daemon(tmp: str) -> tuple[subprocess.Popen, str]:
    address = f"ipc://{tmp}/bench.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "controller.cli", "serve", "--address", address,
           "--host-pool-pages", str(POOL_PAGES), "--layout-num-layers", "2", "--layout-num-kv-heads", "1",
           "--layout-head-dim", "8", "--layout-page-size", "16", "--layout-dtype", "bfloat16"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        session = Session(address, request_timeout_s=0.2)
        try:
            session.ping()
            return proc, address
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
        finally:
            session.close()
    proc.kill()
    raise RuntimeError("daemon did not start")


def bench_daemon(address: str, iters: int) -> dict:
    pool = torch.zeros(LAYOUT.pool_shape(2100), dtype=LAYOUT.torch_dtype)
    cache = DaemonClient(address, NAMESPACE, pool)
    session = cache._link.session
    out = {}
    try:
        for n in (128, 2048):
            tokens = prompt(n, n)
            cache.store(tokens, list(range(n)))
            blob = p.join_keys(page_keys(NAMESPACE.digest(), tokens, 16))
            rtt, full = [], []
            for _ in range(iters):
                t0 = time.perf_counter()
                reply = session.call(p.Lookup(blob, True))
                rtt.append(time.perf_counter() - t0)
                session.call(p.Release(reply.lease_id))
                t0 = time.perf_counter()
                result = cache.lookup(tokens)
                full.append(time.perf_counter() - t0)
                cache.release(result)
                assert result.num_l2_pages == n
            out[f"lookup_{n}"] = pct(rtt)
            out[f"client_lookup_with_hashing_{n}"] = pct(full)
        store = []
        for i in range(min(iters, 200)):
            tokens = prompt(10_000 + i, 128)
            t0 = time.perf_counter()
            stored = cache.store(tokens, list(range(128)))
            store.append(time.perf_counter() - t0)
            assert stored.num_new_pages == 128
        out["store_128_new_pages"] = pct(store)
    finally:
        cache.close()
    return out


def worker(address: str, seconds: float, seed: int) -> None:
    """One client process: 128-page lookups + releases for ``seconds``; prints JSON."""
    pool = torch.zeros(LAYOUT.pool_shape(256), dtype=LAYOUT.torch_dtype)
    cache = DaemonClient(address, NAMESPACE, pool, client_name=f"bench-{seed}")
    session = cache._link.session
    blob = p.join_keys(page_keys(NAMESPACE.digest(), prompt(128, 128), 16))
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        reply = session.call(p.Lookup(blob, True))
        times.append(time.perf_counter() - t0)
        session.call(p.Release(reply.lease_id))
    timeouts = session.channel.num_timeouts
    cache.close()
    print(json.dumps({"times": times, "timeouts": timeouts}))


def bench_clients(address: str, counts: list[int], seconds: float) -> dict:
    out = {}
    for n in counts:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", address, str(seconds), str(i)],
                                  stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  text=True) for i in range(n)]
        results = [json.loads(proc.communicate(timeout=seconds + 120)[0]) for proc in procs]
        times = [t for r in results for t in r["times"]]
        out[f"{n}_clients"] = {
            # each worker issues one lookup and one release per iteration
            "lookups_per_s": round(len(times) / seconds), **pct(times),
            "timeouts": sum(r["timeouts"] for r in results)}
        print(n, "clients:", out[f"{n}_clients"], file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--machine", default=platform.node(), help="label of the machine in the JSON")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--out", default=str(REPO / "bench/results/daemon.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = {"machine": args.machine, "cpus": os.cpu_count(), "python": platform.python_version(),
              "layout": LAYOUT.fingerprint(), "in_process": bench_in_process(args.iters)}
    print("in-process:", report["in_process"], file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_daemon(tmp)
        try:
            report["daemon"] = bench_daemon(address, args.iters)
            print("daemon:", report["daemon"], file=sys.stderr)
            report["throughput"] = bench_clients(address, [1, 4, 8], args.seconds)
        finally:
            proc.terminate()
            proc.wait(30)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
