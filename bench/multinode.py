"""Two nodes over one distributed L3: the TTFT of a request whose prefix another node computed.

Two `kvstore serve` daemons ("nodes": separate host pools, ipc addresses and processes)
share a Redis Cluster (three masters) or a Mooncake Store (master + one storage process)
as L3, write-through. Per context C and store, each repetition takes a fresh prompt::

    node A: generate(prompt[:B])   computes the prefix, stores its pages -> L2 A -> L3
            (waited until L3 holds them: `l3_write_s`)
    node B: generate(prompt)       cold L2: its lookup finds prompt[:B] in L3 (wait_complete),
                                   loads it, computes prompt[B:]   -> TTFT cross node
    node A: generate(prompt)       the same prefix from its own L2  -> TTFT same node
    no cache: generate(prompt)     one pass                         -> TTFT recompute

B = `--fraction` of C in whole pages. Node B's request must be an L3 hit of exactly B
tokens (the bench stops otherwise: a miss is not a hit), and its tokens and logits must
equal a cache-off run split at B, bit for bit (the exit status says). A last set of
prompts runs on node B with the `auto` policy (the cost model may choose to recompute
when L3 is slower than the model): its TTFT and what it loaded are reported, not asserted.
Engines and daemons run in this process and its children on one machine; the store
runs on loopback.

    python bench/multinode.py --out bench/results/multinode_cpu.json          # CPU, preset small
    python bench/multinode.py --device cuda --preset llama3-8b --page-size 64 \\
        --contexts 4096,16384 --stores redis_cluster --out $OUT/multinode_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "connectors"))   # l3_servers: real store servers

import controller  # noqa: E402
from controller.config import PrefetchConfig  # noqa: E402
from controller.daemon.launch import serve_command, wait_until_serving  # noqa: E402
from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine  # noqa: E402
from kvstore.page_keys import KeyNamespace  # noqa: E402

STORES = ("redis_cluster", "mooncake")


class BenchError(RuntimeError):
    """What the bench times did not happen (e.g. node B's request was not an L3 hit)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/multinode_cpu.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--contexts", default="512,1024", help="prompt lengths, comma-separated")
    p.add_argument("--fraction", type=float, default=0.9, help="share of the prompt node A computed")
    p.add_argument("--reps", type=int, default=3, help="timed prompts per point (after one warm-up)")
    p.add_argument("--decode-steps", type=int, default=4, help="tokens node B decodes (exactness check)")
    p.add_argument("--stores", default=",".join(STORES), help="L3 stores to run: redis_cluster, mooncake")
    p.add_argument("--machine", default=None, help="a name for the machine in the JSON")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.stores = [s for s in args.stores.split(",") if s]
    if any(s not in STORES for s in args.stores):
        p.error(f"--stores: each of {STORES}")
    if not 0 < args.fraction < 1:
        p.error("--fraction must be in (0, 1)")
    if any(c % args.page_size or c < 2 * args.page_size for c in args.contexts):
        p.error("--contexts: multiples of --page-size, at least two pages")
    return args


def machine(args: argparse.Namespace, device: torch.device) -> dict:
    info = {"name": args.machine or platform.node(), "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


# ---- the store and the two daemons ------------------------------------------------------------
@contextlib.contextmanager
def shared_store(name: str, segment_bytes: int) -> Iterator[tuple[str, dict]]:
    """(connector, options) of a fresh store on loopback; pytest's Skipped if not installed."""
    import l3_servers

    if name == "redis_cluster":
        with l3_servers.redis_cluster_or_skip() as cluster:
            yield "redis_cluster", {"startup_nodes": cluster.startup_nodes}
    else:
        with l3_servers.mooncake_or_skip(segment_bytes) as store:
            yield "mooncake", store.client_options()


@contextlib.contextmanager
def daemon(workdir: Path, name: str, layout, host_pages: int, connector: str,
           options: dict) -> Iterator[str]:
    """One node's `kvstore serve` (write-through to the shared L3); its address."""
    address = f"ipc://{workdir / name / 'kvstore.sock'}"
    flags = ["--l3-connector", connector, "--l3-options", json.dumps(options),
             "--l3-write-policy", "write_through", "--prefault-host-pool", "true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(workdir / f"{name}.log", "ab") as log:
        import l3_servers   # its preexec_fn: the daemon dies with this process, as the servers do

        proc = subprocess.Popen(serve_command(address, layout, host_pages, flags), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=l3_servers._die_with_parent)
        try:
            wait_until_serving(address, proc, 120)
            yield address
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@dataclass
class Node:
    """An engine attached to one node's daemon."""

    engine: ReferenceEngine
    client: controller.CacheClient

    def close(self) -> None:
        self.engine.attach_cache(None)
        self.client.close()


def node(world: "World", address: str, policy: str) -> Node:
    engine = world.new_engine()
    client = controller.connect_daemon(address, world.namespace, engine.kv_pool,
                                       prefetch=PrefetchConfig(policy=policy), request_timeout_s=60.0)
    engine.attach_cache(client)
    return Node(engine, client)


def wait_written(client, timeout_s: float = 300.0) -> float:
    """Seconds until the client's daemon holds no page that L3 lacks."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        stats = client.daemon_stats()
        if stats["num_due_pages"] == 0 and stats["num_backup_queue_pages"] == 0:
            return time.perf_counter() - start
        time.sleep(0.005)
    raise BenchError(f"node A's pages did not reach L3 within {timeout_s} s: {stats}")


# ---- the model -------------------------------------------------------------------------------------
@dataclass
class World:
    args: argparse.Namespace
    device: torch.device
    model: ReferenceDecoder
    layout: object
    namespace: KeyNamespace
    num_pages: int
    chunk: int

    def new_engine(self) -> ReferenceEngine:
        return ReferenceEngine(self.model, self.layout, self.num_pages, prefill_chunk_len=self.chunk)

    def prompt(self, context: int, seed: int) -> list[int]:
        return np.random.default_rng(seed).integers(0, self.model.config.vocab_size, context).tolist()

    @property
    def cached_tokens(self) -> dict[int, int]:
        P = self.args.page_size
        return {c: int(self.args.fraction * c) // P * P for c in self.args.contexts}


def build_world(args: argparse.Namespace) -> World:
    device = torch.device(args.device)
    longest = max(args.contexts) + args.decode_steps
    config = DecoderConfig.preset(args.preset, max_positions=longest + args.page_size)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = ReferenceDecoder(config, device=device, dtype=dtype, attention="sdpa",
                             draw_on="device" if cuda else "cpu")
    layout = config.kv_layout(args.page_size, dtype="bfloat16" if cuda else "float32")
    # Recompute is one pass over the prompt (the fast baseline); node B's run is checked
    # against a cache-off run split where its hit ends (decoder/engine.py's module doc).
    chunk = -(-config.max_positions // args.page_size) * args.page_size
    num_pages = -(-longest // args.page_size) + 2
    return World(args, device, model, layout, KeyNamespace(config.model_id, layout), num_pages, chunk)


def sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


# ---- one point -------------------------------------------------------------------------------------
def cross_node_request(world: World, a: Node, b: Node, plain: ReferenceEngine, context: int,
                       seed: int) -> dict:
    """Node A computes a prefix; node B serves prefix + suffix from L3; node A serves prefix +
    another suffix from its own L2 (another suffix: B's pages of the first are in L3 by then);
    the cache-less engine recomputes the prompt (in the same repetition: same conditions)."""
    num_cached = world.cached_tokens[context]
    prompt = world.prompt(context, seed)
    other = prompt[:num_cached] + world.prompt(context - num_cached, seed + 1)
    a.engine.generate(prompt[:num_cached], 1)
    l3_write_s = wait_written(a.client)
    sync(world)
    from_l3 = b.engine.generate(prompt, world.args.decode_steps)
    if from_l3.num_l3_tokens != num_cached or from_l3.num_l2_tokens:
        raise BenchError(f"node B's request was not an L3 hit of the {num_cached} tokens node A stored: "
                         f"{from_l3.num_l3_tokens} from L3, {from_l3.num_l2_tokens} from L2")
    same_node = a.engine.generate(other, 1)
    if same_node.num_l2_tokens != num_cached or same_node.num_l3_tokens:
        raise BenchError(f"node A's own request hit {same_node.num_l2_tokens} tokens in L2 and "
                         f"{same_node.num_l3_tokens} in L3, not {num_cached} in L2")
    recompute = plain.generate(prompt, 1)
    return {"prompt": prompt, "from_l3": from_l3, "same_node": same_node, "l3_write_s": l3_write_s,
            "recompute": recompute}


def _seed(*parts: object) -> int:
    """A seed from names and numbers, the same in every run (str hashes are salted)."""
    return zlib.crc32(repr(parts).encode())


def run_point(world: World, store: str, a: Node, b: Node, plain: ReferenceEngine, context: int) -> dict:
    num_cached = world.cached_tokens[context]
    runs = [cross_node_request(world, a, b, plain, context, _seed(store, context, rep))
            for rep in range(world.args.reps + 1)]
    first, timed = runs[0], runs[1:]                       # runs[0]: the warm-up
    split = plain.generate(first["prompt"], world.args.decode_steps, split_at=num_cached)
    exact = (first["from_l3"].tokens == split.tokens
             and bool(torch.equal(first["from_l3"].logits, split.logits)))
    cross = statistics.median(r["from_l3"].ttft_s for r in timed)
    same = statistics.median(r["same_node"].ttft_s for r in timed)
    recompute_s = statistics.median(r["recompute"].ttft_s for r in timed)
    page_bytes = world.layout.page_bytes
    row = {
        "store": store, "context": context, "cached_tokens": num_cached,
        "bytes_from_l3": num_cached // world.args.page_size * page_bytes,
        "ttft_cross_node_l3_s": cross, "ttft_same_node_l2_s": same, "ttft_recompute_s": recompute_s,
        "recompute_over_cross_node": recompute_s / cross, "recompute_over_same_node": recompute_s / same,
        "cross_node_over_same_node": cross / same,
        "l3_write_s": statistics.median(r["l3_write_s"] for r in timed),
        "node_b_l3_hit_tokens": [r["from_l3"].num_l3_tokens for r in runs],
        "exact_vs_split_run": exact, "decode_steps_checked": world.args.decode_steps,
    }
    print(f"{store:>13} {context:>6}: cross node {cross * 1e3:8.1f} ms, same node {same * 1e3:8.1f} ms, "
          f"recompute {recompute_s * 1e3:8.1f} ms ({row['recompute_over_cross_node']:.2f}x); "
          f"exact: {exact}", flush=True)
    return row


def run_auto(world: World, store: str, a: Node, b_auto: Node, context: int, recompute_s: float) -> dict:
    """Node B with the `auto` policy on fresh prompts: what it chose, and its TTFT."""
    num_cached = world.cached_tokens[context]
    runs = []
    for rep in range(world.args.reps + 1):
        prompt = world.prompt(context, _seed("auto", store, context, rep))
        a.engine.generate(prompt[:num_cached], 1)
        wait_written(a.client)
        runs.append(b_auto.engine.generate(prompt, 1))
    timed = runs[1:]
    return {"store": store, "context": context, "cached_tokens": num_cached,
            "ttft_auto_s": statistics.median(r.ttft_s for r in timed), "ttft_recompute_s": recompute_s,
            "recompute_over_auto": recompute_s / statistics.median(r.ttft_s for r in timed),
            "loaded_from_l3_tokens": [r.num_l3_tokens for r in timed]}


def run_store(world: World, store: str, plain: ReferenceEngine, out: dict) -> None:
    args = world.args
    # L2 holds two of the longest prompts (pages are in L3 once written: eviction is fine);
    # the store holds every page written: ~2.2 prompts per repetition, with the auto runs.
    host_pages = 2 * -(-max(args.contexts) // args.page_size) + 16
    store_pages = 2.5 * sum(c * (args.reps + 1) for c in args.contexts) / args.page_size
    segment = int(store_pages * world.layout.page_bytes) + (64 << 20)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kvstore-multinode-") as tmp:
        connector, options = stack.enter_context(shared_store(store, segment))
        workdir = Path(tmp)
        address_a = stack.enter_context(daemon(workdir, "nodeA", world.layout, host_pages, connector, options))
        address_b = stack.enter_context(daemon(workdir, "nodeB", world.layout, host_pages, connector, options))
        nodes = [node(world, address_a, "wait_complete"), node(world, address_b, "wait_complete"),
                 node(world, address_b, "auto")]
        for n in nodes:
            stack.callback(n.close)
        a, b, b_auto = nodes
        for context in args.contexts:
            point = run_point(world, store, a, b, plain, context)
            out["points"].append(point)
            out["auto"].append(run_auto(world, store, a, b_auto, context, point["ttft_recompute_s"]))
        stats_b = b.client.daemon_stats()
        out["node_b_daemon"][store] = {k: stats_b[k] for k in (
            "num_l3_hit_pages", "num_l3_bad_values", "num_l3_errors", "l3_bytes_read", "l3_read_gbps",
            "l3_read_latency_s") if k in stats_b}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the daemons and store servers are stopped.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        out = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not out["points"]:
        print("no store ran", file=sys.stderr)
        return 2
    if not all(p["exact_vs_split_run"] for p in out["points"]):
        print("node B's output differs from the split cache-off run", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> dict:
    """Every store's points, written to ``args.out`` as JSON (and returned)."""
    import pytest

    started = time.perf_counter()
    world = build_world(args)
    out = {"machine": machine(args, world.device), "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "model": {"preset": args.preset, "dtype": str(world.model.dtype), "page_size": args.page_size,
                     "page_bytes": world.layout.page_bytes, "prefill_chunk_len": world.chunk},
           "fraction": args.fraction, "reps": args.reps, "write_policy": "write_through",
           "points": [], "auto": [], "node_b_daemon": {}, "skipped": []}
    plain = world.new_engine()
    for store in args.stores:
        try:
            run_store(world, store, plain, out)
        except pytest.skip.Exception as exc:           # its servers are not installed here
            out["skipped"].append({"store": store, "reason": str(exc)})
            print(f"{store}: skipped ({exc})", flush=True)
    out["load_average_at_end"] = os.getloadavg()
    out["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
