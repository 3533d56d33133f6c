"""The disk store owns its directory: it never touches files it did not write,
refuses a directory it cannot own, and has one owner at a time."""

from __future__ import annotations

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
