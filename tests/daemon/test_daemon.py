"""The daemon as a real subprocess: sharing between processes, isolation, client and daemon
crashes, shutdown, security. Every scenario ends with the daemon's check_integrity."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from controller.api import CacheError, LoadError
from controller.client import Credentials, DaemonClient
from kvstore.page_keys import KeyNamespace

from daemon_proc import (LAYOUT, NAMESPACE, DaemonProcess, child_env, device_pool, layout_args,
                         run_worker, running_daemon, spawn_worker, wait_until)
from daemon_worker import tokens

P = LAYOUT.page_size


def pages_equal(a, a_pages, b, b_pages) -> bool:
    return all(torch.equal(a[:, :, x], b[:, :, y]) for x, y in zip(a_pages, b_pages))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the scenarios that need no config of their own (each uses its own
    token seeds); starting one costs seconds (torch import) on the 2-core CI machine."""
    with running_daemon(tmp_path_factory.mktemp("shared"), args=["--metrics-port", str(METRICS_PORT)]) as d:
        yield d
    assert d.proc is None


def test_pages_stored_by_one_process_are_loaded_by_others(daemon):
    stored = run_worker(daemon, "store", "7", "6")
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["num_new_pages"] == 6
    again = run_worker(daemon, "store", "7", "6")  # a second engine: nothing new to write
    assert json.loads(again.stdout)["num_new_pages"] == 0

    writer_pool = device_pool(16, seed=7)  # what the worker's pool held
    pool = device_pool(32)
    with daemon.client(pool) as cache:
        result = cache.lookup(tokens(7, 6) + [1, 2])
        assert (result.num_l2_pages, result.num_l3_pages) == (6, 0)
        handle = cache.load(result, list(range(20, 26)))
        for layer in range(LAYOUT.num_layers):
            handle.wait_layer(layer)
        assert pages_equal(writer_pool, range(6), pool, range(20, 26))
        cache.release(result)
        cache.check_integrity(quiescent=True)


@pytest.mark.parametrize("seed, other", [
    (101, KeyNamespace("another-model", LAYOUT)),
    (102, KeyNamespace("daemon-test-model", LAYOUT, tp_rank=1, tp_size=2)),
    (103, KeyNamespace("daemon-test-model", LAYOUT, lora_id="adapter-1")),
    (104, KeyNamespace("daemon-test-model", LAYOUT, cache_salt="tenant-b")),
], ids=["model", "tp-rank", "lora", "salt"])
def test_another_namespace_never_hits(daemon, seed, other):
    with daemon.client(device_pool(16, seed=1)) as mine, daemon.client(device_pool(16), other) as theirs:
        assert mine.store(tokens(seed, 4), range(4)).num_new_pages == 4
        assert theirs.lookup(tokens(seed, 4)).num_hit_pages == 0
        assert mine.lookup(tokens(seed, 4)).num_hit_pages == 4


def test_a_client_with_another_layout_is_refused(daemon):
    from kvstore.layout import KVLayout

    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
    with pytest.raises(CacheError, match="bad_layout"):
        DaemonClient(daemon.address, KeyNamespace("m", other), torch.zeros(other.pool_shape(4)))


def test_killed_client_leases_and_reservations_are_reclaimed(tmp_path):
    """The daemon watches the client's process: once it is gone its holdings come back
    at once, long before the lease TTL (30 s here)."""
    ttl = 30.0
    with running_daemon(tmp_path, args=["--lease-ttl-s", str(ttl), "--heartbeat-interval-s", "0.2"]) as daemon:
        worker = spawn_worker(daemon, "hold", "3", "5")
        try:
            assert worker.stdout.readline() and worker.stdout.readline().strip() == "READY"
            stats = daemon.stats()
            assert stats["num_leases"] == 1 and stats["num_reservations"] == 1
            assert stats["num_reserved_slots"] == 3
            with pytest.raises(Exception):  # leased and reserved: not quiescent
                daemon.check_integrity(quiescent=True)
        finally:
            worker.kill()  # kill -9
            worker.wait(10)
        assert wait_until(lambda: daemon.stats()["num_leases"] == 0, timeout_s=3.0)
        stats = daemon.stats()
        assert (stats["num_reservations"], stats["num_reserved_slots"]) == (0, 0)
        assert stats["num_reaped_clients"] == 1
        assert stats["num_cached_pages"] == 5  # its committed pages stay cached
        daemon.check_integrity(quiescent=True)


def test_daemon_kill9_and_restart_with_disk_serves_what_disk_holds(tmp_path):
    args = ["--l3-connector", "disk", "--l3-write-policy", "write_through", "--l3-options",
            json.dumps({"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 26})]
    daemon = DaemonProcess(tmp_path, args=args)
    pool = device_pool(32, seed=5)
    try:
        daemon.start()
        old_segment = daemon.stats()["segment"]
        cache = daemon.client(pool, request_timeout_s=1.0)
        assert cache.store(tokens(5, 6), range(6)).num_new_pages == 6
        held = cache.lookup(tokens(5, 6))
        assert held.num_hit_pages == 6
        # write_through runs in the background: the pages are on disk once it has run
        assert wait_until(lambda: daemon.stats()["num_l3_written_pages"] == 6, timeout_s=10.0)
        daemon.kill9()
        # (its segment may outlive it; Python's resource tracker usually removes it)
        assert cache.lookup(tokens(5, 6)).num_hit_pages == 0  # no daemon: a miss, not a hang

        daemon.start()
        assert not os.path.exists(f"/dev/shm/{old_segment}")  # the new daemon removed it
        # misses (fail open) until the client's probe sees the daemon back
        assert wait_until(lambda: cache.link_health().is_up, timeout_s=20.0)
        result = cache.lookup(tokens(5, 6))  # re-attaches by itself
        assert (result.num_l2_pages, result.num_l3_pages) == (0, 6)
        with pytest.raises(LoadError, match="recompute its pages") as lost:
            cache.load(held, list(range(10, 16)))  # its slots belong to a dead instance
        assert lost.value.first_bad_page == 0      # the engine recomputes the whole hit
        cache.release(held)  # a no-op, not an error
        cache.load(result, list(range(10, 16))).wait_all()
        assert pages_equal(pool, range(6), pool, range(10, 16))
        cache.release(result)
        cache.close()
        daemon.check_integrity(quiescent=True)
    finally:
        daemon.stop()


def test_sigterm_writes_back_to_disk_and_cleans_up(tmp_path):
    args = ["--l3-connector", "disk", "--l3-options",
            json.dumps({"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 26})]  # write_back
    daemon = DaemonProcess(tmp_path, args=args)
    try:
        daemon.start()
        segment = daemon.stats()["segment"]
        with daemon.client(device_pool(32, seed=9)) as cache:
            assert cache.store(tokens(9, 8), range(8)).num_new_pages == 8
        assert daemon.stop(signal.SIGTERM) == 0
        assert not os.path.exists(f"/dev/shm/{segment}")
        assert not Path(daemon.address[len("ipc://"):]).exists()
        assert "wrote 8 pages back to L3" in daemon.log()

        daemon.start()
        with daemon.client(device_pool(32)) as cache:
            result = cache.lookup(tokens(9, 8))
            assert (result.num_l2_pages, result.num_l3_pages) == (0, 8)
            cache.release(result)
    finally:
        daemon.stop()


def test_a_second_daemon_on_the_same_address_is_refused(daemon):
    second = subprocess.run(daemon.cmd, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3
    assert "already serving" in second.stderr
    daemon.stats()  # the first one is unharmed


def test_ipc_directory_and_socket_are_private(daemon):
    sock = Path(daemon.address[len("ipc://"):])
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_tcp_needs_credentials_to_start(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "controller.cli", "serve", "--address", address, *layout_args()]
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no credentials" in result.stderr


def test_tcp_refuses_missing_or_wrong_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    address = f"tcp://127.0.0.1:{free_port()}"
    with running_daemon(tmp_path, address=address, args=["--auth-token-file", str(token_file)],
                        token=b"s3cret-token") as daemon:
        for bad in (b"", b"wrong"):
            with pytest.raises(CacheError, match="unauthorized"):
                DaemonClient(address, NAMESPACE, device_pool(8), credentials=Credentials(token=bad),
                             request_timeout_s=3.0)
        with daemon.client(device_pool(8, seed=2)) as cache:
            assert cache.store(tokens(2, 2), range(2)).num_new_pages == 2
        stats = daemon.stats()
        assert stats["num_refused"] >= 2
        assert stats["num_clients"] == 1  # the stats session itself; refused ones never got one


def test_metrics_endpoint_and_status_command(daemon):
    before = daemon.stats()
    with daemon.client(device_pool(16, seed=4)) as cache:
        cache.store(tokens(4, 3), range(3))
        cache.release(cache.lookup(tokens(4, 3) + tokens(5, 2)))
    after = daemon.stats()
    assert after["num_l2_hit_pages"] - before["num_l2_hit_pages"] == 3
    assert after["num_lookup_pages"] - before["num_lookup_pages"] == 5
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'kvstore_lookup_pages_total{tier="l2"}' in text
    assert 'kvstore_lookup_pages_total{tier="miss"}' in text
    for name in ("kvstore_lookup_seconds_bucket", "kvstore_refused_connections",
                 "kvstore_bad_messages", "kvstore_clients", "kvstore_leases", "kvstore_pool_slots"):
        assert name in text
    status = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--address",
                             daemon.address], env=child_env(), capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert "slots used" in status.stdout and "page hit rate" in status.stdout


def test_status_without_a_daemon_fails_clearly(tmp_path):
    status = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--address",
                             f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"], env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "no reply" in status.stderr


def test_a_closed_client_refuses_every_call(daemon):
    cache = daemon.client(device_pool(8))
    cache.close()
    cache.close()
    for call in (lambda: cache.lookup(tokens(1, 1)), lambda: cache.store(tokens(1, 1), [0]),
                 cache.stats):
        with pytest.raises(CacheError, match="closed"):
            call()


def test_prefetch_through_the_daemon_hints_best_effort_and_waits(tmp_path):
    """Pages only in the daemon's L3 come up by its prefetch: a hint's ticket, a best_effort
    lookup that answers at once, and the default wait_complete lookup that waits for them."""
    from controller.config import PrefetchConfig

    args = ["--l3-connector", "disk", "--l3-write-policy", "write_back", "--l3-options",
            json.dumps({"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 26})]
    with running_daemon(tmp_path, host_pages=8, args=args) as daemon:
        pool = device_pool(32, seed=9)
        cache = daemon.client(pool)
        for seed in (1, 2, 3):                  # three chains of 6 pages: L2 holds 8
            assert cache.store(tokens(seed, 6), range(6 * (seed - 1), 6 * seed)).num_new_pages == 6
        ticket = cache.prefetch(tokens(1, 6))   # chain 1 went down to disk
        assert ticket.wait(20) and ticket.num_ready == 6 and ticket.num_failed == 0
        result = cache.lookup(tokens(1, 6))
        assert result.num_hit_pages == 6        # it is in L2 again
        cache.load(result, list(range(20, 26))).wait_all()
        assert pages_equal(pool, range(0, 6), pool, range(20, 26))
        cache.release(result)

        eager = daemon.client(device_pool(32), prefetch=PrefetchConfig(policy="best_effort"))
        quick = eager.lookup(tokens(2, 6))      # evicted by chain 1 coming back
        assert quick.num_hit_pages + quick.num_pending_pages == 6
        eager.release(quick)
        waiting = cache.lookup(tokens(2, 6))    # wait_complete: every page L3 holds
        assert waiting.num_hit_pages == 6
        cache.release(waiting)
        eager.close()
        cache.close()
        daemon.check_integrity(quiescent=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_daemon_store_returns_before_its_copy_and_publishes_it_later(daemon):
    """The daemon client's store is asynchronous on CUDA, like the embedded one: it returns
    with the copy enqueued behind the engine's work, the engine may overwrite its pages at
    once, and the pages become visible (with the old bytes) once the copy has completed."""
    pool = torch.randn(LAYOUT.pool_shape(32), device="cuda")
    want = pool[:, :, :6].clone()
    writer = daemon.client(pool)
    reader_pool = torch.zeros(LAYOUT.pool_shape(32), device="cuda")
    reader = daemon.client(reader_pool)
    try:
        torch.cuda._sleep(200_000_000)            # the engine's stream is busy: the copy waits
        stored = writer.store(tokens(91, 6), list(range(6)))
        assert stored.num_new_pages == 6 and writer.num_pending_stores == 1
        pool.zero_()                              # reused at once, ordered after the copy
        writer.check_integrity(quiescent=True)    # waits for the copy and publishes it
        result = reader.lookup(tokens(91, 6))
        assert result.num_hit_pages == 6
        handle = reader.load(result, list(range(10, 16)))
        handle.verify()
        torch.cuda.synchronize()
        assert torch.equal(reader_pool[:, :, 10:16], want)
        reader.release(result)
    finally:
        reader.close()
        writer.close()


def test_auto_through_the_daemon_chooses_client_side_and_the_daemon_counts_it(tmp_path):
    """The auto policy runs in the client: with its engine's prefill rate and the L3 rate the
    daemon's prefetcher measured, a slow engine loads the L3 pages, one whose loads cost more
    than its recompute recomputes them; the daemon's stats and metrics count both."""
    from controller.config import PrefetchConfig

    port = free_port()
    args = ["--l3-connector", "disk", "--l3-write-policy", "write_back", "--metrics-port", str(port),
            "--l3-options", json.dumps({"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 26})]
    with running_daemon(tmp_path, host_pages=8, args=args) as daemon:
        cache = daemon.client(device_pool(32, seed=9), prefetch=PrefetchConfig(policy="auto"))
        for seed in (1, 2, 3):                  # three chains of 6 pages: L2 holds 8
            cache.store(tokens(seed, 6), range(6 * (seed - 1), 6 * seed))
        # Evicted pages still in the backup queue would be served from there, not the disk.
        assert wait_until(lambda: daemon.stats()["num_backup_queue_pages"] == 0, 20)
        assert cache.prefetch(tokens(1, 6)).wait(20)   # the daemon measures its disk
        assert cache.stats().l3_read_gbps > 0
        cache.report_prefill(6 * P, 0, 60.0)   # a slow engine: reading the disk pays
        slow = cache.lookup(tokens(2, 6))
        assert slow.num_hit_pages == 6 and slow.num_l3_pages > 0
        cache.release(slow)
        fast = daemon.client(device_pool(32), prefetch=PrefetchConfig(policy="auto"))
        for _ in range(3):   # recompute is (nearly) free, loads are slow: nothing pays
            fast.report_prefill(P, 5 * P, 1e-9, load_wait_s=1.0)
        fast.stats()                               # reads the daemon's L3 rate
        chosen = fast.lookup(tokens(3, 6))         # chain 3, in L2 or on disk
        assert chosen.num_hit_pages == 0
        fast.release(chosen)
        cache.stats()                              # each client sends its counts (then, or once a second)
        stats = fast.stats()
        assert stats.num_loaded_l3_pages >= slow.num_l3_pages
        assert stats.num_recomputed_by_choice_pages >= 1
        fast.close()
        cache.close()
        # The metrics show the choices: pages recomputed by choice, pages loaded per tier.
        for name in ("num_recomputed_by_choice_pages", "num_loaded_l3_pages"):
            assert wait_until(lambda: _metric_text(port, name), 10), name
        daemon.check_integrity(quiescent=True)


def _metric_text(port: int, name: str) -> str | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    lines = [line for line in body.splitlines() if f'name="{name}"' in line and not line.endswith(" 0.0")]
    return "\n".join(lines) or None
