"""The connector contract, run against every backend (see conftest.make_conn).

What every backend must do, whatever the store underneath:
  * a page put (True) reads back bit for bit through get and get_into;
  * absent, corrupt, truncated and other-fingerprint values are misses (None /
    False), counted in stats, never exceptions and never wrong bytes;
  * exists counts leading present keys; delete counts removed keys;
  * concurrent puts of one key leave one whole value;
  * misuse (bad keys, mismatched lengths, closed connector) raises ConnectorError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import pytest

from connectors import ConnectorError, open_connector
from connectors.codec import CODECS, HEADER_LEN, Frame
from l3_util import bf16_page, keys_of, run


async def _corrupt(conn, key: bytes, how: str) -> None:
    """Overwrite the stored frame of key through the backend's raw write."""
    [frame] = await conn._raw_get_many([key])
    assert frame is not None
    frame = bytearray(frame)
    if how == "flip":
        frame[HEADER_LEN + len(frame[HEADER_LEN:]) // 2] ^= 0x10
    elif how == "truncate":
        del frame[len(frame) - 7:]
    elif how == "header":
        frame[0] ^= 0xFF
    await conn._raw_delete_many([key])
    assert await conn._raw_put_many([key], [Frame.of(bytes(frame))]) == [True]


def test_round_trip_get_and_get_into(make_conn):
    sizes = [1, 4096, 300_001]
    pages = [os.urandom(s) for s in sizes]
    ks = keys_of(len(pages), b"rt")

    async def scenario():
        async with make_conn() as c:
            assert await c.put(ks, pages) == [True] * len(pages)
            assert await c.get(ks) == pages
            bufs = [bytearray(s) for s in sizes]
            assert await c.get_into(ks, [memoryview(b) for b in bufs]) == [True] * len(pages)
            assert [bytes(b) for b in bufs] == pages
            st = c.stats()
            assert (st.hits, st.misses, st.puts) == (6, 0, 3)
            assert st.raw_bytes_out == sum(sizes) and st.raw_bytes_in == 2 * sum(sizes)

    run(scenario())


def test_misses_and_exists_prefix(make_conn):
    ks = keys_of(6, b"ex")

    async def scenario():
        async with make_conn() as c:
            assert await c.exists(ks) == 0
            assert await c.get(ks[:2]) == [None, None]
            await c.put(ks[:3] + ks[4:5], [b"a" * 100] * 4)   # key 3 missing
            assert await c.exists(ks) == 3
            assert await c.exists(ks[3:]) == 0
            assert await c.exists([]) == 0
            got = await c.get(ks)
            assert [g is not None for g in got] == [True, True, True, False, True, False]
            assert c.stats().misses == 4

    run(scenario())


def test_delete_and_overwrite(make_conn):
    ks = keys_of(3, b"del")

    async def scenario():
        async with make_conn() as c:
            await c.put(ks, [b"x" * 10] * 3)
            assert await c.put(ks[:1], [b"y" * 20]) == [True]
            assert await c.get(ks[:1]) == [b"y" * 20]
            assert await c.delete(ks[:2] + keys_of(1, b"nope")) == 2
            assert await c.get(ks) == [None, None, b"x" * 10]
            assert c.stats().deletes == 2

    run(scenario())


def test_batches_larger_than_max_batch_keys(make_conn):
    ks = keys_of(37, b"bt")
    pages = [os.urandom(2000) for _ in ks]

    async def scenario():
        async with make_conn(max_batch_keys=4, max_batch_bytes=6000) as c:
            assert all(await c.put(ks, pages))
            assert await c.get(ks) == pages
            assert await c.exists(ks) == 37
            assert await c.delete(ks) == 37

    run(scenario())


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec(make_conn, codec):
    pages = [bf16_page(64 * 1024, 1), os.urandom(3001), b"\0" * 50_000]
    ks = keys_of(3, codec.encode()[:6])

    async def scenario():
        async with make_conn(codec=codec) as c:
            assert all(await c.put(ks, pages))
            assert await c.get(ks) == pages
        async with make_conn(codec="none") as reader:   # codec is per value, not per reader
            assert await reader.get(ks) == pages

    run(scenario())


def test_wrong_fingerprint_is_a_miss(make_conn):
    ks = keys_of(2, b"fp")

    async def scenario():
        async with make_conn(fingerprint="llama3-8b/bf16/page16") as w:
            await w.put(ks, [b"p" * 64] * 2)
        async with make_conn(fingerprint="llama3-8b/fp8/page16") as r:
            assert await r.get(ks) == [None, None]
            assert await r.get_into(ks[:1], [memoryview(bytearray(64))]) == [False]
            st = r.stats()
            assert (st.wrong_fingerprint, st.corrupt, st.misses) == (3, 0, 3)
        async with make_conn(fingerprint="llama3-8b/bf16/page16") as again:
            assert await again.get(ks) == [b"p" * 64] * 2   # not dropped by the other reader

    run(scenario())


def test_values_swapped_between_keys_are_counted_misses(make_conn):
    """Two valid frames stored under each other's key never serve the other page's bytes."""
    ks = keys_of(3, b"swap")
    pages = [os.urandom(3000) for _ in ks]

    async def scenario():
        async with make_conn() as c:
            assert await c.put(ks, pages) == [True] * 3
            a, b = await c._raw_get_many(ks[:2])
            await c._raw_delete_many(ks[:2])
            assert await c._raw_put_many(ks[:2], [Frame.of(bytes(b)), Frame.of(bytes(a))]) == [True] * 2
            assert await c.get(ks) == [None, None, pages[2]]
            buf = memoryview(bytearray(3000))
            assert await c.get_into(ks[2:], [buf]) == [True] and bytes(buf) == pages[2]
            st = c.stats()
            assert (st.wrong_key, st.corrupt, st.hits, st.misses) == (2, 0, 2, 2)
            assert await c.exists(ks[:1]) == 0    # a misplaced value is dropped

    run(scenario())


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_corrupt_value_is_a_counted_miss(make_conn, how):
    ks = keys_of(3, how.encode())
    pages = [os.urandom(5000) for _ in ks]

    async def scenario():
        async with make_conn(codec="shuffle_lz4") as c:
            await c.put(ks, pages)
            await _corrupt(c, ks[1], how)
            assert await c.get(ks) == [pages[0], None, pages[2]]
            buf = memoryview(bytearray(5000))
            await c.put(ks[2:], [pages[2]])
            await _corrupt(c, ks[2], how)
            assert await c.get_into(ks[2:], [buf]) == [False]
            st = c.stats()
            assert (st.corrupt, st.hits, st.misses) == (2, 2, 2)
            assert await c.exists(ks[1:2]) == 0    # a corrupt value is dropped

    run(scenario())


def test_get_into_wrong_buffer_size_is_a_miss_not_corruption(make_conn):
    ks = keys_of(1, b"sz")

    async def scenario():
        async with make_conn() as c:
            await c.put(ks, [b"z" * 100])
            assert await c.get_into(ks, [memoryview(bytearray(99))]) == [False]
            assert c.stats().wrong_size == 1
            assert await c.get(ks) == [b"z" * 100]

    run(scenario())


def test_concurrent_writers_of_one_key(make_conn):
    [key] = keys_of(1, b"cw")
    values = [bytes([i]) * (20_000 + i) for i in range(8)]

    async def scenario():
        async with make_conn() as c:
            results = await asyncio.gather(*(c.put([key], [v]) for v in values))
            assert any(r == [True] for r in results)
            [got] = await c.get([key])
            assert got in values    # one whole value, never a mix

    run(scenario())


def test_misuse_raises_connector_error(make_conn):
    async def scenario():
        async with make_conn() as c:
            with pytest.raises(ConnectorError):
                await c.get(["not bytes"])
            with pytest.raises(ConnectorError):
                await c.get([b""])
            with pytest.raises(ConnectorError):
                await c.put(keys_of(2), [b"a"])
            with pytest.raises(ConnectorError):
                await c.put(keys_of(1), [12345])
            with pytest.raises(ConnectorError):
                await c.get_into(keys_of(1), [memoryview(b"readonly")])
        with pytest.raises(ConnectorError):
            await c.get(keys_of(1))

    run(scenario())


def test_open_connector_rejects_bad_names_and_options(tmp_path):
    with pytest.raises(ConnectorError, match="use one of"):
        open_connector("s3")
    with pytest.raises(ConnectorError, match="valid options"):
        open_connector("memory", colour="blue")
    with pytest.raises(ConnectorError, match="codec"):
        open_connector("memory", codec="gzip")
    with pytest.raises(ConnectorError, match="path"):
        open_connector("disk", capacity_bytes=10)
    with pytest.raises(ConnectorError, match="capacity_bytes"):
        open_connector("disk", path=str(tmp_path), capacity_bytes=0)


def test_import_is_lazy():
    code = ("import sys, connectors; bad = {'redis', 'mooncake', 'aiofiles'} & set(sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())


def test_no_write_into_buffers_after_get_into_is_cancelled(make_conn):
    """The get_into promise: once the call is over (here: cancelled while its
    pages decode on worker threads), nothing writes into the buffers."""
    pages = [bf16_page(512 * 1024, i) for i in range(16)]
    ks = keys_of(len(pages), b"cancel")

    async def scenario():
        async with make_conn(codec="shuffle_zstd") as c:
            assert all(await c.put(ks, pages))
            bufs = [bytearray(len(p)) for p in pages]
            task = asyncio.create_task(c.get_into(ks, [memoryview(b) for b in bufs]))
            for _ in range(200):                     # until the decode has started
                await asyncio.sleep(0.001)
                if any(b[:64] != bytes(64) for b in bufs) or task.done():
                    break
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for b in bufs:
                b[:] = b"\xee" * len(b)
            await asyncio.sleep(0.3)
            assert all(b == b"\xee" * len(b) for b in bufs)

    run(scenario())
