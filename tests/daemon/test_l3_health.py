"""L3 write errors on a real full file system (a 1 MiB tmpfs): counted, logged once per
interval instead of once per page, and shown as L3 health in the connector, in
``kvstore status`` and in the daemon's metrics. (A full disk used to log thousands of
WARNING lines while num_l3_errors stayed 0.)"""

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from connectors import open_connector
from connectors.health import StoreHealth

from daemon_proc import LAYOUT, REPO, child_env, running_daemon, small_filesystem, wait_until
from daemon_worker import tokens

NO_SPACE = "No space left on device"


def test_full_disk_write_errors_are_counted_and_logged_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with small_filesystem(tmp_path / "fs", 1 << 20) as fs:
        async def scenario():
            store = open_connector("disk", path=str(fs / "l3"), capacity_bytes=64 << 20)
            keys = [i.to_bytes(16, "little") for i in range(100)]
            page = os.urandom(32 << 10)
            stored = []
            for lo in range(0, len(keys), 10):
                stored += await store.put(keys[lo:lo + 10], [page] * 10)
            num_failed = stored.count(False)
            assert 0 < num_failed < len(keys)          # ~30 pages fit in 1 MiB
            health = store.health()
            assert store.stats().write_errors == health.num_write_errors == num_failed
            assert health.failing == ("write",) and NO_SPACE in health.last_error
            assert health.status == "failing (writes)" and health.failing_since <= time.time()
            lines = [r for r in caplog.records if NO_SPACE in r.getMessage()]
            assert len(lines) == 1 and lines[0].levelno == logging.WARNING   # not one per page

            await store.delete(keys[:10])              # room again: writes work, said once
            assert await store.put([b"x" * 16], [page]) == [True]
            assert store.health().is_ok
            assert sum("writes ok again after" in r.getMessage() for r in caplog.records) == 1
            await store.close()

        asyncio.run(scenario())


def test_health_log_says_how_many_errors_each_interval(caplog):
    health = StoreHealth("TestStore", log_interval_s=0.2)
    for _ in range(50):
        health.failed("write", "disk full")
    time.sleep(0.25)
    health.failed("write", "disk full")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "L3 TestStore: writes failing: disk full"
    assert re.fullmatch(r"L3 TestStore: writes still failing: 50 errors in the last 0 s "
                        r"\(51 since [0-9:]+\); last: disk full", messages[1])
    assert len(messages) == 2
    health.failed("read", "cannot read x")
    health.succeeded("write")
    snap = health.snapshot()
    assert snap.failing == ("read",) and snap.num_write_errors == 51 and snap.num_read_errors == 1
    assert "writes ok again after 51 errors" in caplog.records[-1].getMessage()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_shows_l3_health_in_status_and_metrics(tmp_path):
    port = free_port()
    with small_filesystem(tmp_path / "fs", 1 << 20) as fs:
        args = ["--l3-connector", "disk", "--l3-write-policy", "write_back", "--l3-options",
                json.dumps({"path": str(fs / "l3"), "capacity_bytes": 64 << 20}),
                "--metrics-port", str(port)]
        with running_daemon(tmp_path, host_pages=16, args=args) as daemon:
            with daemon.client(torch.randn(LAYOUT.pool_shape(16))) as cache:
                for seed in range(60):                  # 480 pages through 16 slots to disk
                    cache.store(tokens(seed, 8), range(8))
            assert wait_until(lambda: daemon.stats()["l3_write_errors"] > 0
                              and daemon.stats()["num_backup_queue_pages"] == 0, timeout_s=30)
            stats = daemon.stats()
            assert stats["l3_status"] == "failing (writes)" and NO_SPACE in stats["l3_last_error"]
            assert stats["num_l3_errors"] >= stats["l3_write_errors"] > 50

            status = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--address",
                                     daemon.address], env=child_env(), cwd=REPO,
                                    capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            assert re.search(r"L3 +FAILING \(WRITES\) since .*; \d+ write errors", status.stdout)
            assert NO_SPACE in status.stdout

            def metric(name: str) -> float:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
                return float(re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M).group(1))

            assert wait_until(lambda: metric("kvstore_l3_up") == 0, timeout_s=5)
            assert metric('kvstore_l3_errors{direction="write"}') == stats["l3_write_errors"]
            assert metric("kvstore_l3_failing_since_seconds") > 0
            daemon.stop()
            assert daemon.log().count(NO_SPACE) <= 3, daemon.log()[-2000:]
