"""Disk store specifics: capacity and eviction, restart, crash debris, full disk."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import aiofiles.os
import pytest

from connectors import disk as disk_mod
from connectors import open_connector
from connectors.codec import HEADER_LEN
from l3_util import keys_of, run

PAGE = 10_000
FRAME = PAGE + HEADER_LEN


def _open(path, capacity=10 * FRAME, **kw):
    return open_connector("disk", path=str(path), capacity_bytes=capacity, **kw)


def _files(path) -> list[str]:
    """Every file under path but the store's ownership marker."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                  if f != disk_mod.MARKER_NAME)


def test_capacity_is_never_exceeded_and_lru_goes_first(tmp_path):
    ks = keys_of(14, b"cap")

    async def scenario():
        async with _open(tmp_path) as c:
            for k in ks[:10]:     # one by one: pages of one batch land in any order
                assert await c.put([k], [os.urandom(PAGE)]) == [True]
            assert await c.get(ks[:1]) != [None]          # key 0 is now the most recent
            assert all(await c.put(ks[10:12], [os.urandom(PAGE)] * 2))
            assert c.used_bytes <= c.capacity_bytes
            present = [k for k in ks[:12] if await c.exists([k])]
            assert ks[0] in present and ks[1] not in present and ks[2] not in present
            assert await c.put(ks[12:13], [os.urandom(11 * FRAME)]) == [False]   # larger than the store
            assert sum(os.path.getsize(f) for f in _files(tmp_path)) <= c.capacity_bytes

    run(scenario())


def test_restart_reloads_index_and_cleans_debris(tmp_path):
    ks = keys_of(4, b"rs")
    pages = [os.urandom(PAGE) for _ in ks]

    async def write():
        async with _open(tmp_path) as c:
            await c.put(ks, pages)

    async def reread():
        async with _open(tmp_path) as c:
            assert c.used_bytes == 3 * FRAME
            assert await c.exists(ks) == 1        # key 1 was truncated -> removed at open
            got = await c.get(ks)
            assert got == [pages[0], None, None, pages[3]]   # key 2 corrupt -> miss
            assert c.stats().corrupt == 1
        return _files(tmp_path)

    run(write())
    files = {os.path.basename(f): f for f in _files(tmp_path)}
    with open(files[ks[1].hex()], "r+b") as f:          # a crash mid-copy
        f.truncate(FRAME // 2)
    with open(files[ks[2].hex()], "r+b") as f:          # bit rot
        f.seek(FRAME - 5)
        f.write(b"\xff\x00")
    debris = os.path.join(os.path.dirname(files[ks[0].hex()]), "." + ks[0].hex() + ".deadbeef.tmp")
    with open(debris, "wb") as f:                        # a temp file left by a crash
        f.write(b"half a page")
    left = run(reread())
    assert sorted(map(os.path.basename, left)) == sorted([ks[0].hex(), ks[3].hex()])


def test_full_disk_is_a_counted_put_failure(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        ks = keys_of(10, b"full")

        async def scenario():
            # capacity says 1 MiB, the file system holds 64 KiB: writes fail with ENOSPC
            async with _open(mnt, capacity=1 << 20) as c:
                stored = await c.put(ks, [os.urandom(PAGE) for _ in ks])
                assert 3 <= sum(stored) < 10
                assert c.stats().put_failures == 10 - sum(stored)
                assert not [f for f in _files(mnt) if f.endswith(".tmp")]
                ok = [k for k, s in zip(ks, stored) if s]
                assert None not in await c.get(ok)
                assert c.used_bytes == len(ok) * FRAME

        run(scenario())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def slow_rename(monkeypatch):
    """slow_rename(delay_s) makes every rename of a page file onto its name
    take delay_s (a slow or hung disk), so a put times out in the middle of
    it; slow_rename(0) ends that. The rename runs on a worker thread either way."""
    real = os.replace

    def install(delay_s: float) -> None:
        if not delay_s:
            monkeypatch.undo()
            return

        def replace(src, dst, *a, **kw):
            time.sleep(delay_s)
            return real(src, dst, *a, **kw)

        async def areplace(src, dst, *a, **kw):   # what aiofiles.os.replace would do
            return await asyncio.get_running_loop().run_in_executor(None, replace, src, dst)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(aiofiles.os, "replace", areplace)

    return install


async def _until(cond, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "timed out waiting"
        await asyncio.sleep(0.02)


def _tmp_files(path) -> list[str]:
    return [f for f in _files(path) if f.endswith(".tmp")]


def test_timed_out_put_gives_back_capacity_and_leaves_no_files(tmp_path, slow_rename):
    ks = keys_of(16, b"tmo")

    async def scenario():
        async with _open(tmp_path, capacity=16 * FRAME, timeout_s=0.1) as c:
            assert await c.put(ks[:1], [os.urandom(PAGE)]) == [True]   # an old value of key 0
            slow_rename(0.3)
            assert await c.put(ks, [os.urandom(PAGE) for _ in ks]) == [False] * 16
            assert c.stats().timeouts == 1
            # once the abandoned renames end, all is given back
            await _until(lambda: c.used_bytes == 0 and not _files(tmp_path), 6.0)
            assert sum(c._index.values()) == 0
            slow_rename(0)
            await asyncio.sleep(0.25)         # past error_backoff_s
            pages = [os.urandom(PAGE) for _ in ks]
            assert await c.put(ks, pages) == [True] * 16      # the whole capacity is usable
            assert await c.get(ks) == pages

    run(scenario())


def test_cancelled_put_is_undone_and_next_put_of_key_waits(tmp_path, slow_rename):
    k = keys_of(1, b"cnc")

    async def scenario():
        async with _open(tmp_path, capacity=2 * FRAME) as c:
            slow_rename(0.3)
            put = asyncio.ensure_future(c.put(k, [os.urandom(PAGE)]))
            await asyncio.sleep(0.1)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            assert _tmp_files(tmp_path)       # the rename is still running
            slow_rename(0)
            page = os.urandom(PAGE)
            assert await c.put(k, [page]) == [True]   # after the cancelled write is undone
            assert await c.get(k) == [page]
            await asyncio.sleep(0.4)
            assert await c.get(k) == [page]           # not replaced by the stale write
            assert c.used_bytes == sum(c._index.values()) == FRAME
            assert _tmp_files(tmp_path) == []
        async with _open(tmp_path, capacity=2 * FRAME) as c:
            assert await c.get(k) == [page]

    run(scenario())


def test_close_waits_for_abandoned_writes(tmp_path, slow_rename):
    ks = keys_of(3, b"cls")

    async def scenario():
        async with _open(tmp_path, timeout_s=0.05) as c:
            slow_rename(0.3)
            assert await c.put(ks, [os.urandom(PAGE)] * 3) == [False] * 3
            assert c.stats().timeouts == 1
        assert _files(tmp_path) == []

    run(scenario())


def test_oversize_file_is_never_read_whole(tmp_path, monkeypatch):
    k = keys_of(1, b"huge")

    async def scenario():
        async with _open(tmp_path, capacity=1 << 30, max_value_bytes=PAGE) as c:
            assert await c.put(k, [os.urandom(PAGE)]) == [True]
            with open(c._file(k[0]), "ab") as f:
                f.write(b"\0" * (8 << 20))
            c._index[k[0]] = os.path.getsize(c._file(k[0]))   # even if the index agrees
            c._used = c._index[k[0]]
            reads, real_preadv = [], os.preadv

            def preadv(fd, bufs, *a):
                reads.append(bufs)
                return real_preadv(fd, bufs, *a)

            monkeypatch.setattr(os, "preadv", preadv)
            assert await c.get(k) == [None]
            assert reads == [] and c.stats().corrupt == 1
            assert c.used_bytes == 0 and _files(tmp_path) == []

    run(scenario())


def test_rebuild_ignores_names_that_are_not_the_key_hex(tmp_path):
    k = b"\x12\xab\xcd" + bytes(13)

    async def write():
        async with _open(tmp_path) as c:
            assert await c.put([k], [os.urandom(PAGE)]) == [True]
            return c._file(k)

    path = run(write())
    shard = os.path.dirname(path)
    name = os.path.basename(path)
    upper = os.path.join(shard, name.upper())             # "12ABCD...": fromhex accepts it
    spaced = os.path.join(shard, name[:2] + " " + name[2:])   # "12 abcd...": so does this
    os.rename(path, upper)
    with open(upper, "rb") as src, open(spaced, "wb") as dst:
        dst.write(src.read())

    async def reopen():
        async with _open(tmp_path) as c:
            assert c.used_bytes == 0 and len(c._index) == 0
            assert await c.get([k]) == [None]

    run(reopen())
    assert _files(tmp_path) == sorted([upper, spaced])   # not its own names: left alone
