"""Daemon bench: lookup + release over prompt length, embedded and through the daemon, against
a bare pyzmq echo; store; hit lookups/s of 1, 4 and 8 client processes.

    python bench/daemon.py --machine "2-core dev box"      # -> bench/results/daemon_2-core-dev-box.json

Everything goes through the public API (``EmbeddedController``, ``DaemonClient``), with
16-token pages and every prompt in L2. Honest by construction:

- the host pool holds every prompt the bench stores (working set and store phase),
  and after the store phase each working prompt must still hit in full;
- every timed lookup must hit all of its pages (a miss raises: a miss is not a
  hit lookup), in this process and in the worker processes;
- ``repeat`` rows look the same prompt up again, so the client's key cache hashes
  nothing; ``cold_key_hashing`` is the hashing of a prompt seen for the first time,
  ``index_work`` a ``CacheCore`` lookup + release on keys hashed up front;
- ``zmq_echo``: a REQ/REP round trip between two processes of a request and reply
  the size of the daemon's Lookup and LookupReply for that many pages (the floor
  of the transport), measured in the same run;
- child processes keep the caller's ``PYTHONPATH``; the daemon's output goes to
  a log file whose tail is printed if it dies;
- beside wall-time percentiles, CPU time per call of this process and of its peer
  (the daemon, the echo server): on a machine shared with other work the wall
  time also measures the queue for a core, the CPU time the work itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from controller.client import DaemonClient  # noqa: E402
from controller.config import ControllerConfig  # noqa: E402
from controller.core import CacheCore  # noqa: E402
from controller.daemon.launch import serve_command, wait_until_serving  # noqa: E402
from controller.embedded import EmbeddedController  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402
from kvstore.page_keys import KeyNamespace, page_keys  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, page_size=16, dtype="bfloat16")
NAMESPACE = KeyNamespace("bench-model", LAYOUT)
SIZES = (128, 512, 2048, 8192, 32768)
WORKER_PAGES = 128


def pool_pages(sizes: tuple[int, ...], store_prompts: int) -> int:
    """Every prompt the bench stores fits: nothing it looks up can have been evicted."""
    return sum(sizes) + store_prompts * 128 + 1024


def pct(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_us": round(s[len(s) // 2] * 1e6, 1), "p99_us": round(s[min(int(len(s) * 0.99), len(s) - 1)] * 1e6, 1),
            "n": len(s)}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(loop: Callable[[], list[float]], peer_pid: int | None = None) -> dict:
    """Run ``loop`` (it returns the wall seconds of each call) and add CPU per call: this
    process's, and ``peer_pid``'s (the daemon, the echo server) over the same calls.
    On a machine shared with other work, wall time also measures the queue for a core;
    CPU time per call is the work itself."""
    cpu0, peer0 = time.process_time(), process_cpu_s(peer_pid) if peer_pid else 0.0
    times = loop()
    out = pct(times)
    out["cpu_us_per_call"] = round((time.process_time() - cpu0) / len(times) * 1e6, 1)
    if peer_pid:
        peer = (process_cpu_s(peer_pid) - peer0) / len(times) * 1e6
        out["peer_cpu_us_per_call"] = None if peer != peer else round(peer, 1)
    return out


def prompt(seed: int, num_pages: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50000, num_pages * 16, dtype=np.int32)


def iterations(iters: int, num_pages: int) -> int:
    """Fewer rounds for long prompts: about the same time per size."""
    return max(5, iters * 128 // num_pages)


def child_env() -> dict[str, str]:
    """The caller's environment, its PYTHONPATH kept, with this checkout first."""
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def time_hits(cache, tokens: np.ndarray, num_pages: int, rounds: int) -> list[float]:
    """Seconds of each lookup + release of ``tokens``; each lookup must hit every page."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = cache.lookup(tokens)
        cache.release(result)
        times.append(time.perf_counter() - t0)
        if result.num_l2_pages != num_pages:
            raise AssertionError(f"lookup hit {result.num_l2_pages} of {num_pages} pages: a miss is not a hit")
    return times


def time_calls(fn: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_embedded(sizes: tuple[int, ...], iters: int, store_prompts: int) -> dict:
    """Per size: lookup + release through EmbeddedController, cold hashing, index work; store."""
    config = ControllerConfig(host_pool_pages=pool_pages(sizes, store_prompts))
    pool = torch.zeros(LAYOUT.pool_shape(max(sizes)), dtype=LAYOUT.torch_dtype)
    cache, core = EmbeddedController(config, NAMESPACE, pool), CacheCore(config, LAYOUT)
    out: dict = {}
    try:
        for n in sizes:
            tokens, rounds = prompt(n, n), iterations(iters, n)
            cache.store(tokens, list(range(n)))
            keys = page_keys(NAMESPACE.digest(), tokens, 16)
            core.commit_store(keys, core.begin_store(keys))

            def index_work() -> None:
                hit = core.lookup(keys)
                if hit.num_l2 != n:
                    raise AssertionError(f"index lookup hit {hit.num_l2} of {n} pages")
                core.release(keys[: hit.num_l2])

            out[str(n)] = {
                "repeat": measured(lambda: time_hits(cache, tokens, n, rounds)),
                "cold_key_hashing": measured(lambda: time_calls(
                    lambda: page_keys(NAMESPACE.digest(), tokens, 16), rounds)),
                "index_work": measured(lambda: time_calls(index_work, rounds)),
            }
            print(f"embedded {n}: {out[str(n)]}", file=sys.stderr)
        out["store_128_new_pages"] = measured(lambda: store_phase(cache, 1, store_prompts))
    finally:
        cache.close()
        core.close()
    return out


def store_phase(cache, seed_base: int, num_prompts: int) -> list[float]:
    """Seconds of each store of 128 new pages (all must be new)."""
    times = []
    for i in range(num_prompts):
        tokens = prompt(seed_base * 100_000 + i, 128)
        t0 = time.perf_counter()
        stored = cache.store(tokens, list(range(128)))
        times.append(time.perf_counter() - t0)
        if stored.num_new_pages != 128:
            raise AssertionError(f"store wrote {stored.num_new_pages} of 128 new pages")
    return times


# The echo server: a bare REP socket that answers every request with a reply of the
# size the request's first 4 bytes ask for. Run with -c: it imports zmq alone.
ECHO_SERVER = """
import sys, zmq
sock = zmq.Context.instance().socket(zmq.REP)
sock.bind(sys.argv[1])
while True:
    msg = sock.recv()
    if msg == b"stop":
        sock.send(b"")
        break
    sock.send(bytes(int.from_bytes(msg[:4], "little")))
sock.close(linger=1000)
"""


def bench_echo(address: str, sizes: tuple[int, ...], iters: int) -> dict:
    """REQ/REP round trips of the Lookup's size out and the LookupReply's back, per size."""
    import zmq

    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, address], env=child_env())
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(address)
    out = {}
    try:
        for n in sizes:
            request = (n * 4 + 48).to_bytes(4, "little") + bytes(n * 16 + 44)  # keys + header

            def round_trip() -> None:
                sock.send(request)
                sock.recv()

            round_trip()
            out[str(n)] = measured(lambda: time_calls(round_trip, iterations(iters, n)), server.pid)
        sock.send(b"stop")
        sock.recv()
    finally:
        sock.close(linger=0)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return out


def bench_daemon(address: str, daemon_pid: int, sizes: tuple[int, ...], iters: int,
                 store_prompts: int) -> dict:
    """Per size: lookup + release through DaemonClient; then the store phase and its check."""
    pool = torch.zeros(LAYOUT.pool_shape(max(sizes)), dtype=LAYOUT.torch_dtype)
    cache = DaemonClient(address, NAMESPACE, pool)
    out: dict = {}
    try:
        for n in sizes:
            tokens = prompt(n, n)
            cache.store(tokens, list(range(n)))
            out[str(n)] = {"repeat": measured(lambda: time_hits(cache, tokens, n, iterations(iters, n)),
                                              daemon_pid)}
            print(f"daemon {n}: {out[str(n)]}", file=sys.stderr)
        out["store_128_new_pages"] = measured(lambda: store_phase(cache, 2, store_prompts), daemon_pid)
        for n in sizes:  # the store phase evicted nothing the workers look up
            time_hits(cache, prompt(n, n), n, 1)
    finally:
        cache.close()
    return out


def worker(address: str, start_at: float, seconds: float, seed: int) -> None:
    """Child process: lookups + releases of the stored 128-page prompt from ``start_at`` for
    ``seconds``; every one must hit in full. Prints JSON."""
    pool = torch.zeros(LAYOUT.pool_shape(WORKER_PAGES), dtype=LAYOUT.torch_dtype)
    cache = DaemonClient(address, NAMESPACE, pool, client_name=f"bench-{seed}")
    tokens = prompt(WORKER_PAGES, WORKER_PAGES)
    time_hits(cache, tokens, WORKER_PAGES, 3)  # connected and warm before the window opens
    time.sleep(max(0.0, start_at - time.time()))
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        times += time_hits(cache, tokens, WORKER_PAGES, 1)
    cache.close()
    print(json.dumps({"times": times}))


def bench_clients(address: str, daemon_pid: int, counts: list[int], seconds: float) -> dict:
    out = {}
    for n in counts:
        daemon_cpu0 = process_cpu_s(daemon_pid)
        start_at = time.time() + 5.0 + 0.5 * n  # every worker connected when the window opens
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", address, str(start_at),
                                   str(seconds), str(i)], stdout=subprocess.PIPE, env=child_env(), text=True)
                 for i in range(n)]
        outputs = [proc.communicate(timeout=seconds + 180)[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"a worker failed (exit codes {[proc.returncode for proc in procs]})")
        times = [t for text in outputs for t in json.loads(text)["times"]]
        # The daemon's CPU per lookup + release over the whole run (connects and warm-up
        # included): near 1 / hit_lookups_per_s when its one request loop is the ceiling.
        daemon_cpu = (process_cpu_s(daemon_pid) - daemon_cpu0) / len(times) * 1e6
        out[f"{n}_clients"] = {"hit_lookups_per_s": round(len(times) / seconds), **pct(times),
                               "daemon_cpu_us_per_lookup": None if daemon_cpu != daemon_cpu else round(daemon_cpu, 1)}
        print(n, "clients:", out[f"{n}_clients"], file=sys.stderr)
    return out


def run_daemon_parts(args: argparse.Namespace, tmp: str) -> dict:
    address = f"ipc://{tmp}/bench.sock"
    log_path = Path(args.daemon_log or Path(tmp) / "daemon.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_command(address, LAYOUT, pool_pages(args.sizes, args.store_prompts)),
                                env=child_env(), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(address, proc, timeout_s=120)
        parts = {"daemon": bench_daemon(address, proc.pid, args.sizes, args.iters, args.store_prompts),
                 "throughput": bench_clients(address, proc.pid, args.clients, args.seconds)}
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {proc.returncode}")
        return parts
    except BaseException:
        print(f"daemon log ({log_path}), last lines:\n{log_path.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(30)


def _cpu_ratio(a: dict, b: dict) -> float | None:
    """Ratio of CPU per call, both processes of each pair together."""
    if a.get("peer_cpu_us_per_call") is None or b.get("peer_cpu_us_per_call") is None:
        return None
    total_b = b["cpu_us_per_call"] + b["peer_cpu_us_per_call"]
    return round((a["cpu_us_per_call"] + a["peer_cpu_us_per_call"]) / total_b, 2) if total_b else None


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=platform.node(), help="label of the machine in the JSON")
    parser.add_argument("--iters", type=int, default=1000, help="rounds at 128 pages (fewer for longer)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--out", help="default: bench/results/daemon_<machine>.json")
    parser.add_argument("--daemon-log", help="the daemon's output (default: a temporary file)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="prompt lengths, pages")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="client processes per run")
    parser.add_argument("--store-prompts", type=int, default=100, help="stores of 128 new pages timed")
    args = parser.parse_args(argv)
    args.sizes = tuple(args.sizes)
    # A SIGTERM ends the bench through its finally blocks, so its daemon and workers stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if WORKER_PAGES not in args.sizes:
        parser.error(f"--sizes must include {WORKER_PAGES} (the throughput workers' prompt)")
    out = Path(args.out or REPO / "bench" / "results" /
               f"daemon_{re.sub(r'[^a-z0-9]+', '-', args.machine.lower()).strip('-')}.json")
    torch.set_num_threads(1)
    # Other work on the machine skews every figure: the load is recorded beside them.
    report = {"machine": args.machine, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
              "python": platform.python_version(),
              "layout": LAYOUT.fingerprint(), "sizes": list(args.sizes),
              "embedded": bench_embedded(args.sizes, args.iters, args.store_prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        report["zmq_echo"] = bench_echo(f"ipc://{tmp}/echo.sock", args.sizes, args.iters)
        report.update(run_daemon_parts(args, tmp))
    report["load_avg_at_end"] = os.getloadavg()
    report["daemon_over_echo_p50"] = {
        str(n): round(report["daemon"][str(n)]["repeat"]["p50_us"] / report["zmq_echo"][str(n)]["p50_us"], 2)
        for n in args.sizes}
    report["daemon_over_echo_cpu"] = {str(n): _cpu_ratio(report["daemon"][str(n)]["repeat"],
                                                         report["zmq_echo"][str(n)]) for n in args.sizes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
