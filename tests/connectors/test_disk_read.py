"""The disk store's get_into path: pages are read straight into the caller's
buffers by a few jobs on worker threads, and checked there.

What it must keep of the contract (test_contract.py runs the rest):
  * a codec-none page lands in the caller's buffer without a copy through bytes,
    with one worker job per worker thread and sub-batch, not one per file;
  * a file changed on disk behind the store's back (bit rot, truncated, grown,
    swapped, removed) is a counted miss, never wrong bytes, never an exception;
  * a compressed frame still decodes, even one exactly as long as the page;
  * once get_into returns, times out or is cancelled, nothing writes into the buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest

from connectors import codec as codec_mod
from connectors import open_connector
from connectors.codec import CODECS, HEADER_LEN
from l3_util import bf16_page, keys_of, run

PAGE = 64 << 10


def _open(path, **kw):
    return open_connector("disk", path=str(path), capacity_bytes=1 << 30, **kw)


@contextlib.contextmanager
def _spy_preadv(monkeypatch, delay_s: float = 0.0):
    """Record the buffers of every os.preadv (optionally slowed down: a busy disk)."""
    calls: list[list] = []
    real = os.preadv

    def preadv(fd, buffers, offset, *a):
        calls.append(list(buffers))
        if delay_s:
            time.sleep(delay_s)
        return real(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    yield calls
    monkeypatch.setattr(os, "preadv", real)


def _bufs(n: int, size: int = PAGE) -> list[bytearray]:
    return [bytearray(size) for _ in range(n)]


def test_pages_land_in_the_callers_buffers_with_few_worker_jobs(tmp_path, monkeypatch):
    ks = keys_of(32, b"direct")
    pages = [os.urandom(PAGE) for _ in ks]

    async def scenario():
        async with _open(tmp_path, max_batch_keys=16, codec_threads=2) as c:
            assert all(await c.put(ks, pages))
            jobs = []
            real_run = c._run_in_pool

            async def run_in_pool(*fns):
                jobs.extend(fns)
                return await real_run(*fns)

            monkeypatch.setattr(c, "_run_in_pool", run_in_pool)
            monkeypatch.setattr(c, "_raw_get_many", None)    # get_into must not need it
            bufs = _bufs(len(ks))
            with _spy_preadv(monkeypatch) as calls:
                assert await c.get_into(ks, [memoryview(b) for b in bufs]) == [True] * 32
            assert bufs == pages
            assert len(jobs) == 4           # 2 sub-batches x 2 worker threads, not 32 files
            # each file: one preadv, its header apart, its page into the caller's buffer
            # (the workers read in any order)
            assert sorted(len(call[0]) for call in calls) == [HEADER_LEN] * 32
            assert {id(call[1].obj) for call in calls} == {id(b) for b in bufs}
            st = c.stats()
            assert (st.hits, st.misses, st.bytes_in, st.raw_bytes_in) == (32, 0, 32 * (PAGE + HEADER_LEN),
                                                                           32 * PAGE)

    run(scenario())


def _flip_payload(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_LEN + 100)
        byte = f.read(1)
        f.seek(HEADER_LEN + 100)
        f.write(bytes([byte[0] ^ 0x40]))


def test_files_changed_behind_the_stores_back_are_counted_misses(tmp_path):
    ks = keys_of(7, b"behind")
    pages = [os.urandom(PAGE) for _ in ks]

    async def scenario():
        async with _open(tmp_path) as c:
            assert all(await c.put(ks, pages))
            paths = [c._file(k) for k in ks]
            _flip_payload(paths[1])                               # bit rot in the page
            os.truncate(paths[2], PAGE)                           # shorter than indexed
            with open(paths[3], "ab") as f:                       # longer than indexed
                f.write(b"\0" * 10)
            os.rename(paths[4], paths[5])                         # 5 holds 4's frame, 4 is gone
            bufs = _bufs(len(ks))
            got = await c.get_into(ks, [memoryview(b) for b in bufs])
            assert got == [True, False, False, False, False, False, True]
            assert (bufs[0], bufs[6]) == (pages[0], pages[6])
            st = c.stats()
            assert (st.corrupt, st.wrong_key, st.hits, st.misses) == (3, 1, 2, 5)
            assert await c.exists(ks[1:2]) == await c.exists(ks[2:3]) == 0    # dropped
            assert await c.exists(ks[4:5]) == await c.exists(ks[5:6]) == 0    # forgotten, dropped
            assert c.used_bytes == sum(c._index.values()) == 2 * (PAGE + HEADER_LEN)

    run(scenario())


def test_a_file_rewritten_while_it_is_read_is_a_plain_miss(tmp_path, monkeypatch):
    """The index says one size, the file has another because a put replaced it
    meanwhile: a miss, not corruption, and the new value stays."""
    [k] = keys_of(1, b"rewrite")

    async def scenario():
        async with _open(tmp_path) as c:
            assert await c.put([k], [os.urandom(PAGE)]) == [True]
            real_open_sized = c._open_sized
            entered, release = threading.Event(), threading.Event()

            def open_sized(path, size):       # the worker waits until the rewrite is done
                entered.set()
                release.wait(5)
                return real_open_sized(path, size)

            monkeypatch.setattr(c, "_open_sized", open_sized)
            buf = bytearray(PAGE)
            read = asyncio.ensure_future(c.get_into([k], [memoryview(buf)]))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            new = os.urandom(PAGE - 1)
            assert await c.put([k], [new]) == [True]
            release.set()
            assert await read == [False]
            assert c.stats().corrupt == 0
            monkeypatch.setattr(c, "_open_sized", real_open_sized)
            assert await c.get([k]) == [new]

    run(scenario())


def _page_as_long_as_its_lz4_frame(size: int) -> bytes:
    """A page whose lz4 payload is exactly `size` bytes: random head, zero tail."""
    lo, hi = 0, size
    while lo < hi:                  # the compressed length grows with the random part
        mid = (lo + hi) // 2
        if len(codec_mod.encode(_mixed(mid, size), CODECS["lz4"], b"\0" * 8).payload) < size:
            lo = mid + 1
        else:
            hi = mid
    for n in range(max(0, lo - 64), min(size, lo + 64)):
        page = _mixed(n, size)
        if len(codec_mod.encode(page, CODECS["lz4"], b"\0" * 8).payload) == size:
            return page
    pytest.skip("no page of this size has an lz4 payload of the same length")


_RANDOM = os.urandom(PAGE)


def _mixed(num_random: int, size: int) -> bytes:
    return _RANDOM[:num_random] + bytes(size - num_random)


def test_compressed_frames_decode_into_the_buffer(tmp_path):
    """Compressed frames are read into scratch memory and decoded; one whose
    payload is exactly the page's length is read into the buffer and decoded
    out of it."""
    odd = _page_as_long_as_its_lz4_frame(PAGE)
    pages = [bf16_page(PAGE, 1), os.urandom(PAGE), odd]
    ks = keys_of(3, b"packed")

    async def scenario():
        async with _open(tmp_path, codec="lz4") as c:
            assert all(await c.put(ks, pages))
            assert os.path.getsize(c._file(ks[2])) == HEADER_LEN + PAGE
            assert os.path.getsize(c._file(ks[0])) != HEADER_LEN + PAGE
        for codec in ["none", "shuffle_zstd"]:     # the codec is per value, not per reader
            async with _open(tmp_path, codec=codec) as c:
                bufs = _bufs(3)
                assert await c.get_into(ks, [memoryview(b) for b in bufs]) == [True] * 3
                assert bufs == pages

    run(scenario())


def test_wrong_fingerprint_and_wrong_size_through_the_fast_path(tmp_path):
    ks = keys_of(2, b"fpsz")

    async def scenario():
        async with _open(tmp_path, fingerprint="a") as c:
            assert all(await c.put(ks, [os.urandom(PAGE)] * 2))
        async with _open(tmp_path, fingerprint="b") as c:
            assert await c.get_into(ks[:1], [memoryview(bytearray(PAGE))]) == [False]
            assert c.stats().wrong_fingerprint == 1
        async with _open(tmp_path, fingerprint="a") as c:
            assert await c.get_into(ks[1:], [memoryview(bytearray(PAGE - 1))]) == [False]
            assert await c.get_into(ks[1:], [memoryview(bytearray(PAGE + 1))]) == [False]
            st = c.stats()
            assert (st.wrong_size, st.corrupt) == (2, 0)
            assert await c.exists(ks) == 2      # neither is dropped

    run(scenario())


def test_oversize_file_is_never_read_by_get_into(tmp_path, monkeypatch):
    [k] = keys_of(1, b"huge")

    async def scenario():
        async with _open(tmp_path, max_value_bytes=PAGE) as c:
            assert await c.put([k], [os.urandom(PAGE)]) == [True]
            with open(c._file(k), "ab") as f:
                f.write(b"\0" * (8 << 20))
            c._index[k] = c._used = os.path.getsize(c._file(k))     # even if the index agrees
            with _spy_preadv(monkeypatch) as calls:
                assert await c.get_into([k], [memoryview(bytearray(PAGE))]) == [False]
            assert calls == [] and c.stats().corrupt == 1
            assert c.used_bytes == 0 and not os.path.exists(c._file(k))

    run(scenario())


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_nothing_writes_into_buffers_after_get_into_is_over(tmp_path, monkeypatch, how):
    ks = keys_of(8, b"over")
    pages = [os.urandom(PAGE) for _ in ks]

    async def scenario():
        async with _open(tmp_path, timeout_s=0.05 if how == "timeout" else 30, codec_threads=2) as c:
            assert all(await c.put(ks, pages))
            bufs = _bufs(len(ks))
            with _spy_preadv(monkeypatch, delay_s=0.03) as calls:
                task = asyncio.ensure_future(c.get_into(ks, [memoryview(b) for b in bufs]))
                if how == "cancel":
                    while not calls:
                        await asyncio.sleep(0.001)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    assert await task == [False] * len(ks)
                    assert c.stats().timeouts == 1
                for b in bufs:
                    b[:] = b"\xee" * len(b)
                await asyncio.sleep(0.3)
            assert all(b == b"\xee" * len(b) for b in bufs)

    run(scenario())
