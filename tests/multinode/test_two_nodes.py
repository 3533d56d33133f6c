"""Two nodes over one distributed store: what node A computed, node B loads bit-exact from
L3; node A killed mid-run; the store restarted mid-run (see nodes.py for the setup).

Every request on node B is compared with recompute (tokens and logits, bit for bit).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import l3_servers
import pytest

from daemon_proc import REPO, child_env, wait_until
from nodes import (LAYOUT, PAGE_SIZE, NodeEngine, l3_flags, l3_keys, prompt, shared_store,
                   tiny_model, two_nodes, wait_written)

from connectors import open_connector

pytestmark = pytest.mark.slow             # real servers and daemons: ~15-25 s a test

BACKENDS = ["redis_cluster", "mooncake"]
PROMPT_LEN = 200                       # 12 full pages of 16 tokens + 8
FULL = PROMPT_LEN // PAGE_SIZE * PAGE_SIZE


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _restart_redis_node(cluster, victim) -> None:
    victim.start()                         # same port and node directory: it rejoins with its slots
    for node in cluster.nodes:
        assert wait_until(lambda n=node: "cluster_state:ok" in n.cli("CLUSTER", "INFO"), 30), \
            f"cluster not ok after restart: {node.cli('CLUSTER', 'INFO')}"


def _restart_mooncake_master(store, connector: str, options: dict) -> None:
    master = store.procs[0]
    store.procs[0] = store._spawn(master.args, "master-restarted.log")
    l3_servers.wait_for(lambda: not l3_servers._is_free(store.rpc_port), 20, "mooncake_master",
                        store.procs[0])
    # A restarted master knows no storage until the storage process has mounted its
    # segment again (it notices by its own pings): puts before that find no space.
    assert wait_until(lambda: _accepts_writes(connector, options), 30), "the store takes no writes"


def _accepts_writes(connector: str, options: dict) -> bool:
    async def probe():
        store = open_connector(connector, **options, key_prefix=b"probe:", timeout_s=2.0)
        try:
            return (await store.put([b"probe-key"], [b"x" * 64]))[0]
        finally:
            await store.close()
    return asyncio.run(probe())


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_b_hits_node_a_pages_in_l3_and_rides_out_a_store_restart(tmp_path, model, backend):
    """Node B loads bit-exact from L3 what node A computed; then a Redis Cluster node (no
    replica: the whole cluster goes down) or the Mooncake master is killed and restarted
    while both nodes serve: L2 hits go on, misses are recomputed, L3 hits come back."""
    with shared_store(backend) as (servers, connector, options), \
            two_nodes(tmp_path, l3_flags(connector, options)) as (node_a, node_b):
        engine_a, engine_b = NodeEngine(model, node_a), NodeEngine(model, node_b)
        try:
            system = prompt(1, 160)                               # 10 pages, shared
            before = system + prompt(2, PROMPT_LEN - 160)
            a = engine_a.run(before)                              # computed on node A
            assert a.exact and a.result.num_cached_tokens == 0
            assert wait_written(node_a)["num_l3_written_pages"] == FULL // PAGE_SIZE

            assert node_b.stats()["num_l2_pages"] == 0            # node B: cold L2
            b = engine_b.run(before)
            assert b.exact                                        # same tokens and logits as recompute
            assert b.result.num_l3_tokens == b.result.num_cached_tokens == FULL
            stats_b = node_b.stats()
            assert stats_b["num_l3_hit_pages"] == FULL // PAGE_SIZE and stats_b["num_l3_bad_values"] == 0
            # The shared system prompt is in node B's L2 now: another request over it hits there.
            other = engine_b.run(system + prompt(3, 50))
            assert other.exact and other.result.num_l2_tokens == 160 and other.result.num_l3_tokens == 0

            victim = _kill_store(backend, servers)

            # Store down: L2 hits go on, new prompts are recomputed, nothing raises.
            for engine in (engine_a, engine_b):
                again = engine.run(before)
                assert again.exact and again.result.num_l2_tokens == FULL
            during = prompt(4, PROMPT_LEN)
            assert engine_a.run(during).exact                     # its write to L3 fails
            missed = engine_b.run(during)
            assert missed.exact and missed.result.num_cached_tokens == 0
            assert wait_until(lambda: node_a.stats()["num_l3_errors"] > 0, 10)
            assert node_b.stats()["num_l3_errors"] > 0 and node_b.stats()["l3_status"] != "ok"

            if backend == "redis_cluster":
                _restart_redis_node(servers, victim)
            else:
                _restart_mooncake_master(servers, connector, options)

            # Back: L3 hits resume (the daemons reconnect by themselves).
            after = prompt(5, PROMPT_LEN)
            assert engine_a.run(after).exact
            assert wait_until(lambda: _written_twice(node_a), 30), node_a.stats()
            back = engine_b.run(after)
            assert back.exact and back.result.num_l3_tokens == FULL
            assert node_b.stats()["num_l3_bad_values"] == 0
        finally:
            engine_a.close()
            engine_b.close()


def _kill_store(backend: str, servers):
    """SIGKILL a Redis Cluster master (returned, to restart) or the Mooncake master."""
    if backend == "redis_cluster":
        victim = servers.nodes[0]
        victim.kill9()
        # Without a replica the cluster declares itself down after the node timeout.
        assert wait_until(lambda: "cluster_state:fail" in servers.nodes[1].cli("CLUSTER", "INFO"), 20)
        return victim
    servers.procs[0].kill()
    servers.procs[0].wait(10)
    return servers.procs[0]


def _written_twice(node) -> bool:
    """Whether the node has written a second prompt's pages (the first was ``before``; the
    pages of the outage stay due, and go to L3 when L2 evicts them or at shutdown)."""
    stats = node.stats()
    return stats["num_backup_queue_pages"] == 0 and stats["num_l3_written_pages"] >= 2 * FULL // PAGE_SIZE


def _spawn_engine_a(address: str, first_seed: int, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("node_engine.py")), address,
                             str(first_seed), str(count), str(PROMPT_LEN)],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _read_whole_or_absent(connector: str, options: dict, keys: list[bytes]) -> tuple[int, object]:
    """Read ``keys`` with a fresh connector: (values found, its counters)."""
    async def read():
        store = open_connector(connector, **options, fingerprint=LAYOUT.fingerprint(), timeout_s=5.0)
        try:
            values = await store.get(keys)
            return sum(v is not None for v in values), store.stats()
        finally:
            await store.close()
    return asyncio.run(read())


def test_node_killed_mid_run_the_other_keeps_serving(tmp_path, model):
    with shared_store("redis_cluster") as (_, connector, options), \
            two_nodes(tmp_path, l3_flags(connector, options)) as (node_a, node_b):
        engine_b = NodeEngine(model, node_b)
        own = [prompt(100 + i, PROMPT_LEN) for i in range(2)]
        try:
            assert all(engine_b.run(p).exact for p in own)         # node B's own pages, in its L2
            engine_a = _spawn_engine_a(node_a.address, 1000, 400)  # far more than it gets to run
            try:
                assert wait_until(lambda: node_a.stats()["num_l3_written_pages"] >= 36, 60), \
                    engine_a.stderr.read() if engine_a.poll() is not None else "node A wrote too little"
                assert engine_a.poll() is None, "node A's engine finished before the kill"
                engine_a.send_signal(signal.SIGKILL)               # the whole node goes: engine ...
                node_a.kill9()                                     # ... and daemon, mid-run
            finally:
                engine_a.kill()
                done = [json.loads(line)["seed"] for line in engine_a.communicate(timeout=30)[0].splitlines()]
            assert len(done) >= 3

            # Node B goes on: its L2 pages, and whatever node A had written to L3.
            for p in own:
                again = engine_b.run(p)
                assert again.exact and again.result.num_l2_tokens == FULL
            touched = done + [done[-1] + 1]                        # the prompt in flight at the kill
            loaded = [engine_b.run(prompt(seed, PROMPT_LEN)) for seed in touched]
            assert all(r.exact for r in loaded)
            assert loaded[0].result.num_l3_tokens == FULL          # written well before the kill
            assert node_b.stats()["num_l3_bad_values"] == 0

            # Every value node A left in L3 is whole: it reads back and checks out, or is absent.
            keys = [k for seed in touched for k in l3_keys(prompt(seed, PROMPT_LEN))]
            found, stats = _read_whole_or_absent(connector, options, keys)
            assert found >= FULL // PAGE_SIZE
            assert stats.corrupt == stats.wrong_key == stats.wrong_size == stats.wrong_fingerprint == 0
        finally:
            engine_b.close()
