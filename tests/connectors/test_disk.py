"""Disk store specifics: capacity and eviction, restart, crash debris, full disk."""

from __future__ import annotations

import os
import subprocess

import pytest

from connectors import open_connector
from connectors.codec import HEADER_LEN
from l3_util import keys_of, run

PAGE = 10_000
FRAME = PAGE + HEADER_LEN


def _open(path, capacity=10 * FRAME, **kw):
    return open_connector("disk", path=str(path), capacity_bytes=capacity, **kw)


def _files(path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


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
    debris = os.path.join(os.path.dirname(files[ks[0].hex()]), "." + ks[0].hex() + ".dead.tmp")
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
