"""The disk store owns its directory: it never touches files it did not write,
refuses a directory it cannot own, and has one owner at a time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from connectors import ConnectorError, open_connector
from connectors import disk as disk_mod
from l3_util import keys_of, run

PAGE = 4096


def _open(path, **kw):
    return open_connector("disk", path=str(path), capacity_bytes=kw.pop("capacity", 1 << 20), **kw)


def _user_files(root) -> dict[str, bytes]:
    """A user's files, some of them in two-character folders that look like shards."""
    files = {"ab/important.db": b"db", "zz/keep.txt": b"keep", "x1/y": b"y", "ab/.hidden": b"h",
             "notes.txt": b"n"}
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return files


def test_directory_with_foreign_files_is_refused_and_untouched(tmp_path):
    files = _user_files(tmp_path)
    with pytest.raises(ConnectorError, match="did not write.*new or empty directory"):
        _open(tmp_path)
    for rel, data in files.items():
        assert (tmp_path / rel).read_bytes() == data
    assert not (tmp_path / disk_mod.MARKER_NAME).exists()


def test_foreign_files_inside_an_owned_directory_are_left_alone(tmp_path):
    ks = keys_of(2, b"own")

    async def write():
        async with _open(tmp_path) as c:
            assert await c.put(ks, [os.urandom(PAGE)] * 2) == [True, True]
            return os.path.dirname(c._file(ks[0]))

    shard = run(write())
    shard_name = os.path.basename(shard)
    stray = {os.path.join(shard, "mine.txt"): b"m",                       # a foreign name
             os.path.join(shard, "ab" * 16): b"not a frame, but a key-like name",
             os.path.join(shard, shard_name + "00" * 15): b"KVL0 other magic" * 4,
             os.path.join(tmp_path, "ff", "x"): b"x"}
    os.makedirs(os.path.join(tmp_path, "ff"), exist_ok=True)
    for path, data in stray.items():
        with open(path, "wb") as f:
            f.write(data)

    async def reopen():
        async with _open(tmp_path) as c:
            assert sorted(c._index) == sorted(ks)
            await c.delete(ks)

    run(reopen())
    for path, data in stray.items():
        with open(path, "rb") as f:
            assert f.read() == data


def test_marker_records_format_and_other_formats_are_refused(tmp_path):
    async def touch():
        async with _open(tmp_path):
            pass

    run(touch())
    info = json.loads((tmp_path / disk_mod.MARKER_NAME).read_text())
    assert info["format"] == disk_mod.DISK_FORMAT_VERSION and info["owner"] == "kvstore"
    (tmp_path / disk_mod.MARKER_NAME).write_text(json.dumps({"format": 99, "owner": "kvstore"}))
    with pytest.raises(ConnectorError, match="format 99"):
        _open(tmp_path)
    (tmp_path / disk_mod.MARKER_NAME).write_text("someone else's file")
    with pytest.raises(ConnectorError, match="not one kvstore wrote"):
        _open(tmp_path)


def test_second_owner_is_refused_in_process_and_across_processes(tmp_path):
    async def scenario():
        async with _open(tmp_path):
            with pytest.raises(ConnectorError, match="in use by another"):
                _open(tmp_path)
            code = ("from connectors import open_connector\n"
                    f"open_connector('disk', path={str(tmp_path)!r}, capacity_bytes=1 << 20)\n")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
            assert proc.returncode != 0 and "in use by another" in proc.stderr
        async with _open(tmp_path):   # the lock went with close
            pass

    run(scenario())


def test_capacity_holds_for_the_directory_as_a_whole(tmp_path):
    """The defect: two writers each counted only their own bytes (1.26 MB in a 1 MB store)."""
    cap = 16 * (PAGE + 64)

    async def scenario():
        async with _open(tmp_path, capacity=cap) as c:
            ks = keys_of(40, b"cap")
            for k in ks:
                await c.put([k], [os.urandom(PAGE)])
            with pytest.raises(ConnectorError):
                _open(tmp_path, capacity=cap)
            total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path)
                        for f in fs if f != disk_mod.MARKER_NAME)
            assert total <= cap

    run(scenario())


@pytest.mark.parametrize("path", ["/proc/self/kvstore-l3", "/sys/kernel", "/proc"])
def test_unwritable_or_system_directory_fails_at_connect(path):
    with pytest.raises(ConnectorError, match="choose|new or empty directory"):
        _open(path)


# ---- the directory removed while its owner runs ------------------------------------------
def _open_elsewhere(path) -> subprocess.CompletedProcess:
    """Another process trying to own ``path`` (as a second daemon would)."""
    code = ("from connectors import open_connector\n"
            f"open_connector('disk', path={str(path)!r}, capacity_bytes=1 << 20)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


def _rm_contents(path) -> None:
    subprocess.run(f"rm -rf {path}/* {path}/.??*", shell=True, check=True)


def test_emptied_directory_stays_owned_and_gets_its_marker_back(tmp_path):
    """``rm -rf DIR/*`` used to unlink the locked marker, so a second owner could lock a new one."""
    home = tmp_path / "l3"
    ks, page = keys_of(4, b"emp"), os.urandom(PAGE)

    async def scenario():
        async with _open(home) as c:
            assert await c.put(ks[:2], [page] * 2) == [True, True]
            _rm_contents(home)
            assert not (home / disk_mod.MARKER_NAME).exists()
            other = _open_elsewhere(home)              # a second daemon on the same directory
            assert other.returncode != 0 and "in use by another" in other.stderr
            with pytest.raises(ConnectorError, match="in use by another"):
                _open(home)
            errors_before = c.stats().errors
            # The owner notices before its next I/O: marker back, vanished pages forgotten.
            assert await c.put(ks[2:], [page] * 2) == [True, True]
            assert c.num_home_losses == 1 and c.stats().errors == errors_before + 1
            info = json.loads((home / disk_mod.MARKER_NAME).read_text())
            assert info["pid"] == os.getpid() and info["owner"] == "kvstore"
            assert await c.get(ks) == [None, None, page, page]
            assert await c.exists(ks[2:]) == 2 and await c.exists(ks) == 0
            assert _open_elsewhere(home).returncode != 0
        async with _open(home) as again:               # a restart accepts its own directory
            assert await again.get(ks[2:]) == [page, page]

    run(scenario())


def test_removed_directory_is_claimed_anew_not_recreated_without_a_marker(tmp_path):
    """``rm -rf DIR`` used to make the next put re-create DIR/<shard> without the marker,
    and the next start refused the directory as foreign."""
    home = tmp_path / "l3"
    ks, page = keys_of(3, b"rmd"), os.urandom(PAGE)

    async def scenario():
        async with _open(home) as c:
            assert await c.put(ks[:1], [page]) == [True]
            subprocess.run(["rm", "-rf", str(home)], check=True)
            assert await c.put(ks[1:], [page] * 2) == [True, True]
            assert c.num_home_losses == 1
            assert json.loads((home / disk_mod.MARKER_NAME).read_text())["pid"] == os.getpid()
            assert await c.get(ks) == [None, page, page]
            assert "in use by another" in _open_elsewhere(home).stderr   # still locked: ours
        async with _open(home) as again:               # the next start takes it
            assert await again.get(ks[1:]) == [page, page]

    run(scenario())


def test_removed_directory_taken_by_another_store_turns_the_tier_off(tmp_path):
    """Whoever claims the path first owns it; the old owner never writes into it."""
    home = tmp_path / "l3"
    ks, page = keys_of(3, b"lost"), os.urandom(PAGE)

    async def scenario():
        async with _open(home) as first:
            assert await first.put(ks[:1], [page]) == [True]
            subprocess.run(["rm", "-rf", str(home)], check=True)
            async with _open(home) as second:          # a new daemon, started meanwhile
                errors_before = first.stats().errors
                assert await first.put(ks[1:], [page] * 2) == [False, False]
                assert await first.get(ks) == [None, None, None]
                assert first.stats().errors > errors_before and first.num_home_losses == 1
                assert await second.exists(ks) == 0    # nothing of the first's landed there
                assert sorted(os.listdir(home)) == [disk_mod.MARKER_NAME]
                assert await second.put(ks[:1], [page]) == [True]
            await asyncio.sleep(first._backoff_s + 0.05)
            assert await first.put(ks[2:], [page]) == [False]   # off until restart

    run(scenario())
