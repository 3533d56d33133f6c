"""KV events of a real daemon: a subscriber process rebuilds its contents per tier from the
events alone, joins late (replay), and follows a restart (new incarnation, cleared view).

The subscriber is examples/kv_events_subscriber.py, run as its own process; it writes
its view to a JSON file that the tests compare with what the daemon reports."""

import json
import os
import subprocess
import sys
import time

import pytest

from controller.config import ConfigError, PrefetchConfig
from controller.daemon.config import load_config
from controller.events import wire
from controller.events.publisher import ZmqEventPublisher
from controller.events.subscriber import EventSubscriber
from daemon_proc import LAYOUT, NAMESPACE, REPO, DaemonProcess, child_env, device_pool, wait_until
from kvstore.page_keys import page_keys

P = LAYOUT.page_size
CHAIN = 3   # pages per stored chain


def chain_tokens(i: int) -> list[int]:
    return [i * 1000 + t + 1 for t in range(CHAIN * P)]


def chain_keys(i: int) -> list[bytes]:
    return page_keys(NAMESPACE.digest(), chain_tokens(i), P)


class SubscriberProcess:
    def __init__(self, tmp_path, events: str, replay: str) -> None:
        self.state_path = tmp_path / "view.json"
        self.daemon = None
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "kv_events_subscriber.py"), events, replay,
             "--quiet", "--state", str(self.state_path)],
            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def daemon_stats(self):
        return self.daemon.stats() if self.daemon is not None else None

    def view(self) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        state["tiers"] = {m: {bytes.fromhex(k) for k in keys} for m, keys in state["tiers"].items()}
        return state

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")


def addresses(tmp_path) -> tuple[str, str, list[str]]:
    events, replay = f"ipc://{tmp_path}/events.sock", f"ipc://{tmp_path}/replay.sock"
    return events, replay, ["--events", events, "--events-replay", replay]


def wait_for_view(sub: SubscriberProcess, matches, what: str) -> dict:
    seen = {}

    def check() -> bool:
        seen["view"] = sub.view()
        return seen["view"] is not None and matches(seen["view"])
    if not wait_until(check, 20.0):
        raise AssertionError(f"the subscriber's view never matched {what}: {seen['view']}; "
                             f"daemon: {sub.daemon_stats()}")
    return seen["view"]


def test_subscriber_rebuilds_l2_exactly_joins_late_and_follows_a_restart(tmp_path):
    events, replay, flags = addresses(tmp_path)
    daemon = DaemonProcess(tmp_path, host_pages=8, args=[*flags, "--eviction-policy", "lru"])
    sub = None
    try:
        daemon.start()
        client = daemon.client(device_pool(16, seed=1))
        for i in range(4):                      # 12 pages into 8 slots: evictions
            client.store(chain_tokens(i), list(range(CHAIN)))
        sub = SubscriberProcess(tmp_path, events, replay)   # joins late: replay has the past
        sub.daemon = daemon

        def same_as_daemon(view: dict) -> bool:
            stats = daemon.stats()
            cached = view["tiers"]["CPU"]
            stored = {k for i in range(8) for k in chain_keys(i)}
            return (view["incarnation"] == stats["instance"] and view["is_complete"]
                    and len(cached) == stats["num_cached_pages"] and cached <= stored)

        # Events come in order: once the last store's pages show, every earlier change has.
        view = wait_for_view(sub, lambda v: same_as_daemon(v) and set(chain_keys(3)) <= v["tiers"]["CPU"],
                             "the daemon's L2")
        for i in range(4, 6):                   # live changes after the join
            client.store(chain_tokens(i), list(range(CHAIN)))
        view = wait_for_view(sub, lambda v: same_as_daemon(v) and set(chain_keys(5)) <= v["tiers"]["CPU"],
                             "the daemon's L2 after more stores")
        # Exact: every chain's cached prefix is what the view predicts (a lookup without
        # L3 changes no contents).
        for i in range(6):
            result = client.lookup(chain_tokens(i))
            predicted = next((n for n, k in enumerate(chain_keys(i)) if k not in view["tiers"]["CPU"]),
                             CHAIN)
            assert result.num_hit_pages == predicted, (i, result, predicted)
            client.release(result)
        old = view["incarnation"]
        client.close()
        daemon.stop()
        daemon.start()                          # a new incarnation: cleared, then new stores
        client = daemon.client(device_pool(16, seed=2))
        client.store(chain_tokens(7), list(range(CHAIN)))
        view = wait_for_view(sub, lambda v: v["incarnation"] != old and same_as_daemon(v),
                             "the restarted daemon")
        assert view["tiers"]["CPU"] == set(chain_keys(7)) and view["num_incarnations"] >= 2
        client.close()
    finally:
        daemon.stop()
        if sub is not None:
            sub.stop()


def disk_pages(home) -> set[bytes]:
    return {bytes.fromhex(name) for _, _, files in os.walk(home) for name in files
            if len(name) == 32 and all(c in "0123456789abcdef" for c in name)}


def test_l3_events_follow_writes_and_reads_of_a_disk_store(tmp_path):
    events, replay, flags = addresses(tmp_path)
    home = tmp_path / "disk"
    daemon = DaemonProcess(tmp_path, host_pages=6, args=[
        *flags, "--l3-connector", "disk", "--l3-write-policy", "write_through",
        "--l3-options", json.dumps({"path": str(home), "capacity_bytes": 1 << 26})])
    sub = None
    try:
        daemon.start()
        sub = SubscriberProcess(tmp_path, events, replay)
        client = daemon.client(device_pool(16, seed=1))
        for i in range(4):                      # 12 pages: all on disk, 6 in L2
            client.store(chain_tokens(i), list(range(CHAIN)))

        def same_as_daemon(view: dict) -> bool:
            stats = daemon.stats()
            return (view["incarnation"] == stats["instance"] and stats["num_backup_queue_pages"] == 0
                    and len(view["tiers"]["CPU"]) == stats["num_cached_pages"]
                    and view["tiers"]["STORAGE"] == disk_pages(home))

        wait_for_view(sub, same_as_daemon, "L2's count and the disk's pages")
        assert len(disk_pages(home)) == 4 * CHAIN
        old = daemon.stats()["instance"]
        client.close()
        daemon.stop()
        daemon.start()    # L2 is empty, the disk keeps its pages; the view starts over
        # wait_complete: this test is about the events of a read, not auto's choice to read
        client = daemon.client(device_pool(16, seed=2), prefetch=PrefetchConfig(policy="wait_complete"))
        result = client.lookup(chain_tokens(0))   # read back from disk: known to be in L3
        assert result.num_l3_pages == CHAIN
        client.release(result)
        client.lookup(chain_tokens(9))            # not on disk: a removal of what is absent

        def learned(view: dict) -> bool:
            stats = daemon.stats()
            return (view["incarnation"] not in (None, old) and stats["num_cached_pages"] == CHAIN
                    and view["tiers"]["CPU"] == set(chain_keys(0))
                    and view["tiers"]["STORAGE"] == set(chain_keys(0)))
        wait_for_view(sub, learned, "the pages read back from disk")
        client.close()
    finally:
        daemon.stop()
        if sub is not None:
            sub.stop()


def test_a_gap_is_filled_by_replay_and_what_the_ring_lost_is_reported(tmp_path):
    """In-process: a subscriber that missed batches asks the replay socket; batches older
    than the ring are reported lost (is_complete False), not invented."""
    events, replay = f"ipc://{tmp_path}/e.sock", f"ipc://{tmp_path}/r.sock"
    keys = [bytes([i]) * 16 for i in range(12)]
    # No heartbeat here: the test counts batches.
    publisher = ZmqEventPublisher(events, replay, b"\x01" * 16, buffer_batches=4, heartbeat_s=3600)
    late = None
    try:
        for key in keys[:6]:                   # seq 1..6 before anyone listens (seq 0: clear)
            publisher.add(wire.stored([key], None, wire.MEDIUM_L2, P))
            publisher.flush()
        late = EventSubscriber(events, replay)
        assert wait_until(lambda: late.catch_up() > 0, 5.0)
        assert late.view.last_seq == 6 and not late.view.is_complete   # seq 0..2 left the ring
        assert late.view.tiers["CPU"] == set(keys[2:6])
        fresh = EventSubscriber(events, replay)
        time.sleep(0.3)   # the SUB connection is up before the next batch (no assert on time)
        publisher.add(wire.removed([keys[2]], wire.MEDIUM_L2))
        publisher.add(wire.stored(keys[6:8], keys[5], wire.MEDIUM_L2, P))
        publisher.flush()
        assert wait_until(lambda: late.poll(0.1) or late.view.last_seq == 7, 5.0)
        assert late.view.tiers["CPU"] == set(keys[3:8])
        # The fresh one's first live batch is seq 7: it asks for 0..6, the ring has 4..6.
        assert wait_until(lambda: fresh.poll(0.1) or fresh.view.last_seq == 7, 5.0)
        assert fresh.num_replays == 1 and not fresh.view.is_complete
        assert fresh.view.tiers["CPU"] == set(keys[3:8])
        fresh.close()
        bad = publisher.num_bad_replay_requests
        import zmq
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay)
        dealer.send_multipart([b"", b"short"])   # not 8 bytes: ignored, counted
        assert wait_until(lambda: publisher.num_bad_replay_requests == bad + 1, 5.0)
        dealer.close(linger=0)
        ctx.term()
    finally:
        if late is not None:
            late.close()
        publisher.close()


def test_a_second_publisher_on_a_live_ipc_address_is_refused(tmp_path):
    events = f"ipc://{tmp_path}/e.sock"
    first = ZmqEventPublisher(events, None, b"\x01" * 16)
    try:
        with pytest.raises(OSError, match="another process listens there"):
            ZmqEventPublisher(events, None, b"\x02" * 16)
    finally:
        first.close()
    ZmqEventPublisher(events, None, b"\x03" * 16).close()   # free again: it binds


@pytest.mark.parametrize("flags, message", [
    ({"events_replay": "ipc:///tmp/x-replay.sock"}, "events is not"),
    ({"events": "ipc:///tmp/x.sock", "events_replay": "ipc:///tmp/x.sock"}, "both"),
    ({"events": "tcp://127.0.0.1"}, "port"),
    ({"events": "ipc:///tmp/x.sock", "events_buffer_batches": "0"}, "> 0"),
])
def test_events_settings_are_checked(flags, message):
    base = {"layout.num_layers": "1", "layout.num_kv_heads": "1", "layout.head_dim": "4",
            "layout.page_size": "4"}
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, flags={**base, **flags})
