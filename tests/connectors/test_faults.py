"""Store faults against real servers: crash mid-batch, hung server, dead node, TTL.

Each test starts its own servers (it kills them), on free loopback ports.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time

import l3_servers as servers
import pytest

from connectors import codec as codec_mod
from connectors import open_connector
from connectors.base import Connector
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


# ---------------------------------------------------------------- backend bugs
class _Scripted(Connector):
    """A backend whose raw get returns script(keys): values no correct
    store returns (wrong types, wrong counts)."""

    def __init__(self, script, **kw) -> None:
        super().__init__(**kw)
        self.script = script
        self.dropped: list[bytes] = []

    async def _raw_get_many(self, keys):
        return self.script(keys)

    async def _raw_put_many(self, keys, frames):
        return [True] * len(keys)

    async def _raw_exists_many(self, keys):
        return [True] * len(keys)

    async def _raw_delete_many(self, keys):
        return 0

    async def _on_corrupt(self, keys):
        self.dropped += keys


def _frame(page: bytes, codec: str = "none", key: bytes = b"") -> bytes:
    return codec_mod.encode_frame(page, codec_mod.codec_id(codec), codec_mod.fingerprint_digest(""),
                                  key=key)


def test_non_bytes_values_are_counted_corrupt_misses():
    ks = keys_of(4, b"types")
    page = os.urandom(1000)

    async def scenario():
        c = _Scripted(lambda keys: [12345, "a str, not a frame" * 3, [1, 2, 3], _frame(page, key=keys[3])])
        async with c:
            assert await c.get(ks) == [None, None, None, page]
            bufs = [bytearray(1000) for _ in ks]
            assert await c.get_into(ks, [memoryview(b) for b in bufs]) == [False, False, False, True]
            assert bufs[3] == page
            st = c.stats()
            assert st.corrupt == 6 and st.hits == 2 and st.misses == 6
            assert c.dropped == ks[:3] * 2

    run(scenario())


@pytest.mark.parametrize("extra", [1, -1])
def test_wrong_number_of_values_is_an_error_all_missed(extra):
    ks = keys_of(3, b"count")
    page = os.urandom(100)

    async def scenario():
        async with _Scripted(lambda keys: [_frame(page)] * (len(keys) + extra)) as c:
            assert await c.get(ks) == [None] * 3
            bufs = [memoryview(bytearray(100)) for _ in ks]
            assert await c.get_into(ks, bufs) == [False] * 3
            st = c.stats()
            assert st.errors == 2 and st.misses == 6 and st.hits == 0

    run(scenario())


def test_bad_value_in_a_worker_decoded_batch_is_a_miss():
    ks = keys_of(4, b"wrk")
    pages = [os.urandom(1 << 20) for _ in range(3)]     # > 1 MiB compressed: decoded on workers
    frames = [_frame(p, "zstd", k) for p, k in zip(pages, ks)] + ["x" * (2 << 20)]

    async def scenario():
        async with _Scripted(lambda keys: frames, codec="zstd") as c:
            bufs = [bytearray(1 << 20) for _ in ks]
            assert await c.get_into(ks, [memoryview(b) for b in bufs]) == [True, True, True, False]
            assert bufs[:3] == pages
            assert await c.get(ks) == pages + [None]
            assert c.stats().corrupt == 2

    run(scenario())


class _Abort(BaseException):
    pass


def test_no_worker_writes_into_buffers_after_get_into_raises(monkeypatch):
    ks = keys_of(4, b"late")
    pages = [os.urandom(1 << 20) for _ in ks]
    frames = [_frame(p, "zstd", k) for p, k in zip(pages, ks)]
    real = codec_mod.decode_into

    def decode_into(frame, out, fp, max_raw, key, encoding=0):
        if frame is frames[0]:
            raise _Abort()          # not an Exception: it escapes the job
        time.sleep(0.2)
        real(frame, out, fp, max_raw, key)

    async def scenario():
        async with _Scripted(lambda keys: frames, codec="zstd", codec_threads=4) as c:
            bufs = [bytearray(1 << 20) for _ in ks]
            monkeypatch.setattr(codec_mod, "decode_into", decode_into)
            with pytest.raises(_Abort):
                await c.get_into(ks, [memoryview(b) for b in bufs])
            after = [bytes(b) for b in bufs]
            await asyncio.sleep(0.4)
            assert [bytes(b) for b in bufs] == after      # nothing wrote after the return

    run(scenario())


def test_redis_put_with_a_pool_that_needs_a_command_name(own_redis):
    """redis-py 5.0.0-5.2.x: ConnectionPool.get_connection(command_name, ...)."""
    ks = keys_of(2, b"b12")

    async def scenario():
        async with _redis(own_redis) as c:
            pool = c._r.connection_pool
            base_needs_name = inspect.signature(
                type(pool).get_connection).parameters["command_name"].default is inspect.Parameter.empty

            class OldPool(type(pool)):
                async def get_connection(self, command_name, *keys, **options):
                    assert isinstance(command_name, str)
                    if base_needs_name:      # running on redis-py 5.0-5.2 itself
                        return await super().get_connection(command_name, *keys, **options)
                    return await super().get_connection()

            pool.__class__ = OldPool      # only the put's own call: redis-py 8 calls it bare
            try:
                assert await c.put(ks, [b"a", b"b"]) == [True, True]
            finally:
                pool.__class__ = OldPool.__base__
            assert await c.get(ks) == [b"a", b"b"]

    run(scenario())


def test_cluster_helpers_work_with_older_redis_py_nodes():
    """redis-py < 6.2: ClusterNode has no release(); <= 7.1: it is unhashable."""
    from collections import deque

    from connectors import redis_store

    class OldNode:
        __hash__ = None

        def __init__(self):
            self._free = deque()

    node, conn = OldNode(), object()
    redis_store._release(node, conn)
    assert list(node._free) == [conn]

    class OldClient:
        closed = False

        async def close(self):
            OldClient.closed = True

    run(redis_store._aclose(OldClient()))
    assert OldClient.closed
