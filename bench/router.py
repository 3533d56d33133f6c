"""Router bench: a KV-event router against round robin, on real daemons, with the agent trace.

    python bench/router.py [--sessions 200] [--host-pages 500] [--out bench/results/router_cpu.json]

Starts 2 x ``--nodes`` daemons (``kvstore serve`` processes, each with its own ipc
address, host pool and KV-event sockets; no L3): one set is routed by
examples/router.py's PrefixRouter, which decides from the daemons' events only,
the other by round robin. Each request of the agent workload (kvstore/replay/
generator.py; one page per 512-token block, its tokens derived from the block id
so that equal prefixes give equal page keys) is a real client's lookup, release
and store through the client library on the node chosen. The hit rate is what
the daemons' lookups found (pages hit / pages asked). Writes JSON with both hit
rates, their ratio, the requests per node and how often the router's prediction
(from events) equalled the hit the daemon then served.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

from controller.client import DaemonClient  # noqa: E402
from controller.daemon.launch import serve_command, wait_until_serving  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402
from kvstore.page_keys import KeyNamespace, page_keys  # noqa: E402
from kvstore.replay.generator import AgentWorkload, generate_agent_records  # noqa: E402
from router import PrefixRouter, RoundRobin  # noqa: E402

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("router-bench", LAYOUT)
MAX_PAGES = 256
"""Requests longer than this many blocks are cut (the device pool of each client)."""


def request_tokens(hash_ids: list[int]) -> list[int]:
    """One page of tokens per trace block, derived from its id (ids are prefix-unique)."""
    P = LAYOUT.page_size
    return [(b * P + j) % (2**31 - 1) for b in hash_ids[:MAX_PAGES] for j in range(P)]


class Node:
    def __init__(self, run_dir: Path, name: str, host_pages: int) -> None:
        self.address = f"ipc://{run_dir}/{name}.sock"
        self.events, self.replay = f"ipc://{run_dir}/{name}-events.sock", f"ipc://{run_dir}/{name}-replay.sock"
        self.log = open(run_dir / f"{name}.log", "wb")
        cmd = serve_command(self.address, LAYOUT, host_pages,
                            ["--events", self.events, "--events-replay", self.replay])
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


def replay(policy_name: str, nodes: list[Node], records: list[dict]) -> dict:
    """Every request through the policy's choice of node; the daemons' hit counts."""
    router = PrefixRouter([(n.events, n.replay) for n in nodes]) if policy_name == "prefix" else None
    policy = router or RoundRobin(len(nodes))
    clients = [DaemonClient(n.address, NAMESPACE, torch.zeros(LAYOUT.pool_shape(MAX_PAGES)))
               for n in nodes]
    pages = list(range(MAX_PAGES))
    digest = NAMESPACE.digest()
    num_pages = num_hit = num_predicted_right = 0
    per_node = [0] * len(nodes)
    start = time.perf_counter()
    try:
        if router is not None:
            router.catch_up()
        for record in records:
            tokens = request_tokens(record["hash_ids"])
            keys = page_keys(digest, tokens, LAYOUT.page_size)   # the router hashes by itself
            node = policy.route(keys)
            predicted = router.matches(keys)[node] if router is not None else None
            client = clients[node]
            result = client.lookup(tokens)
            client.release(result)
            stored = client.store(tokens, pages[:len(keys)])
            per_node[node] += 1
            num_pages += len(keys)
            num_hit += result.num_hit_pages
            num_predicted_right += predicted == result.num_hit_pages
            if router is not None and stored.num_new_pages:
                router.refresh(wait_s=0.005, node=node)   # its batch comes within a loop turn
    finally:
        seconds = time.perf_counter() - start
        for client in clients:
            client.close()
        if router is not None:
            views = [s.view for s in router.subscribers]
            router.close()
    out = {"hit_rate": num_hit / num_pages, "num_hit_pages": num_hit, "num_pages": num_pages,
           "requests_per_node": per_node, "seconds": round(seconds, 2)}
    if router is not None:
        out["prediction_exact_fraction"] = num_predicted_right / len(records)
        out["event_batches_per_node"] = [v.num_batches for v in views]
        out["views_complete"] = all(v.is_complete for v in views)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200, help="agent sessions in the trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--host-pages", type=int, default=500, help="L2 pages per daemon")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "router_cpu.json"))
    args = parser.parse_args(argv)
    workload = AgentWorkload(num_sessions=args.sessions, seed=args.seed)
    records = generate_agent_records(workload)
    with tempfile.TemporaryDirectory(prefix="kvstore-router-") as run_dir:
        sets = {name: [Node(Path(run_dir), f"{name}{i}", args.host_pages) for i in range(args.nodes)]
                for name in ("prefix", "round_robin")}
        try:
            for node in (n for nodes in sets.values() for n in nodes):
                wait_until_serving(node.address, node.proc, 120.0)
            results = {name: replay(name, nodes, records) for name, nodes in sets.items()}
        finally:
            for node in (n for nodes in sets.values() for n in nodes):
                node.stop()
    prefix, rr = results["prefix"], results["round_robin"]
    # What a bench must hold whatever the figures: both policies saw the same requests,
    # and the router's index (events only) agreed with the daemons.
    assert prefix["num_pages"] == rr["num_pages"] and sum(prefix["requests_per_node"]) == len(records)
    assert prefix["views_complete"] and min(prefix["event_batches_per_node"]) > 0
    report = {
        "bench": "router", "machine": "cpu (this box)", "nodes": args.nodes,
        "host_pages_per_node": args.host_pages, "page_tokens": LAYOUT.page_size,
        "workload": {"generator": "kvstore.replay.generator.AgentWorkload",
                     "num_sessions": args.sessions, "seed": args.seed, "num_requests": len(records),
                     "num_distinct_blocks": len({h for r in records for h in r["hash_ids"]})},
        "prefix_router": prefix, "round_robin": rr,
        "hit_rate_ratio": prefix["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"prefix router hit rate {prefix['hit_rate']:.3f} vs round robin {rr['hit_rate']:.3f} "
          f"({report['hit_rate_ratio']:.2f}x); requests per node {prefix['requests_per_node']} vs "
          f"{rr['requests_per_node']}; router prediction exact for "
          f"{prefix['prediction_exact_fraction']:.1%} of requests -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
