"""Store faults against real servers: crash mid-batch, hung server, dead node, TTL.

Each test starts its own servers (it kills them), on free loopback ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import l3_servers as servers
import pytest

from connectors import open_connector
from l3_util import keys_of, run

PAGE = 256 * 1024


@pytest.fixture
def own_redis():
    with servers.redis_server_or_skip() as srv:
        yield srv


def _redis(srv, **kw):
    opts = {"host": "127.0.0.1", "port": srv.port, "timeout_s": 1.0,
            "error_backoff_s": 0.1, **kw}
    return open_connector("redis", **opts)


def test_redis_kill9_mid_batch_then_recovery(own_redis):
    ks = keys_of(400, b"kill")
    pages = {k: os.urandom(PAGE) for k in ks}

    async def scenario():
        async with _redis(own_redis, max_batch_keys=4, max_inflight=1) as c:
            assert all(await c.put(ks[:40], [pages[k] for k in ks[:40]]))
            loop = asyncio.get_running_loop()
            killer = loop.run_in_executor(None, lambda: (time.sleep(0.15), own_redis.kill9()))
            stored, got = [], []
            while not killer.done():        # batches are in flight when the server dies
                stored += await c.put(ks[40:], [pages[k] for k in ks[40:]])
                got += list(zip(ks, await c.get(ks)))
            await killer
            assert False in stored or None in [g for _, g in got]
            assert all(g is None or g == pages[k] for k, g in got)   # never a wrong page
            st = c.stats()
            assert st.errors + st.timeouts >= 1

            t0 = time.monotonic()
            assert await c.get(ks[:4]) == [None] * 4           # server gone: fast misses
            assert time.monotonic() - t0 < 1.0

            own_redis.start()                                    # same port, empty (no persistence)
            await asyncio.sleep(0.15)                            # past error_backoff_s
            assert await c.put(ks[:2], [pages[k] for k in ks[:2]]) == [True, True]
            assert await c.get(ks[:2]) == [pages[k] for k in ks[:2]]

    run(scenario())


def test_redis_hung_server_times_out_then_recovers(own_redis):
    ks = keys_of(3, b"hung")

    async def scenario():
        async with _redis(own_redis, timeout_s=0.3) as c:
            await c.put(ks, [b"v" * 100] * 3)
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                assert await c.get(ks) == [None] * 3
                assert await c.put(ks[:1], [b"w"]) == [False]
                assert time.monotonic() - t0 < 1.5
                assert c.stats().timeouts + c.stats().errors >= 2
                assert c.stats().timeouts >= 1
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.15)
            assert await c.get(ks) == [b"v" * 100] * 3

    run(scenario())


def test_redis_down_at_open_fails_fast():
    port = servers.free_port()

    async def scenario():
        async with open_connector("redis", host="127.0.0.1", port=port, timeout_s=2.0) as c:
            t0 = time.monotonic()
            assert await c.get(keys_of(3)) == [None] * 3
            assert await c.put(keys_of(1), [b"x"]) == [False]
            assert await c.exists(keys_of(2)) == 0
            assert time.monotonic() - t0 < 1.0
            assert c.stats().errors >= 1 and c.stats().misses == 3

    run(scenario())


def test_redis_ttl_expires_values(own_redis):
    ks = keys_of(2, b"ttl")

    async def scenario():
        async with _redis(own_redis, ttl_s=0.2) as c:
            assert await c.put(ks, [b"a", b"b"]) == [True, True]
            assert await c.exists(ks) == 2
            await asyncio.sleep(0.4)
            assert await c.get(ks) == [None, None]

    run(scenario())


def test_cluster_node_killed_only_its_keys_miss():
    with servers.redis_cluster_or_skip() as cluster:
        ks = keys_of(60, b"node")
        pages = {k: os.urandom(4096) for k in ks}

        async def scenario():
            async with open_connector("redis_cluster", startup_nodes=cluster.startup_nodes,
                                      timeout_s=1.0, error_backoff_s=0.0) as c:
                assert all(await c.put(ks, [pages[k] for k in ks]))
                cluster.nodes[0].kill9()
                got = await c.get(ks)
                hits = [g for g in got if g is not None]
                assert all(g == pages[k] for k, g in zip(ks, got) if g is not None)
                # the dead node owned about a third of the slots
                assert 0 < len(hits) < len(ks) and c.stats().errors >= 1
                fresh = keys_of(30, b"node2")
                stored = await c.put(fresh, [b"v" * 100] * 30)
                assert 0 < sum(stored) < 30              # the live nodes' keys are stored
                got = await c.get(fresh)
                assert [g is not None for g in got] == stored

        run(scenario())


def test_mooncake_storage_or_master_killed_gives_misses_not_errors_raised():
    with servers.mooncake_or_skip(segment_bytes=64 << 20) as mc:
        ks = keys_of(8, b"mck")
        pages = {k: os.urandom(64 * 1024) for k in ks}

        async def scenario():
            async with open_connector("mooncake", master_addr=mc.master_addr, timeout_s=2.0,
                                      error_backoff_s=0.0, local_buffer_size=64 << 20) as c:
                assert all(await c.put(ks, [pages[k] for k in ks]))
                mc.procs[1].kill()                  # the storage process holding the data
                mc.procs[1].wait(5)
                got = await c.get(ks)
                assert all(g is None or g == pages[k] for k, g in zip(ks, got))
                mc.procs[0].kill()                  # and the master
                mc.procs[0].wait(5)
                t0 = time.monotonic()
                assert await c.get(ks) == [None] * len(ks)
                assert await c.put(ks[:1], [b"x"]) == [False]
                assert time.monotonic() - t0 < 6.0
                st = c.stats()
                assert st.misses >= len(ks) and st.put_failures == 1

        run(scenario())
