"""The daemon's KV events decoded by vLLM's own classes: the proof of the wire format.

A real ``kvstore serve`` publishes; this test subscribes with plain zmq sockets, as a
vLLM-built router would, and decodes every payload with
``msgspec.msgpack.Decoder(vllm.distributed.kv_events.KVEventBatch)``."""

import msgpack
import pytest
import zmq

from engine_imports import import_engine

kv_events = import_engine("vllm.distributed.kv_events")
msgspec = import_engine("msgspec")

from daemon_proc import LAYOUT, NAMESPACE, DaemonProcess, device_pool  # noqa: E402
from kvstore.page_keys import page_keys  # noqa: E402

pytestmark = pytest.mark.vllm
P = LAYOUT.page_size


def replay_all(address: str, context: zmq.Context) -> list[list[bytes]]:
    """Every buffered message from seq 0, by vLLM's replay protocol."""
    sock = context.socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        messages = []
        while sock.poll(10_000):
            frames = sock.recv_multipart()
            assert frames[0] == b"" and len(frames) == 4, frames
            if frames[2] == kv_events.ZmqEventPublisher.END_SEQ:
                return messages
            messages.append(frames[1:])
        raise AssertionError("the replay socket sent no end marker")
    finally:
        sock.close(linger=0)


def test_vllm_decodes_stores_evictions_and_clears(tmp_path):
    events, replay = f"ipc://{tmp_path}/events.sock", f"ipc://{tmp_path}/replay.sock"
    daemon = DaemonProcess(tmp_path, host_pages=4, args=["--events", events, "--events-replay",
                                                         replay, "--eviction-policy", "lru"])
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events)
    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    tokens_a, tokens_b = list(range(1, 3 * P + 1)), list(range(1000, 1000 + 3 * P))
    keys_a, keys_b = (page_keys(NAMESPACE.digest(), t, P) for t in (tokens_a, tokens_b))
    try:
        daemon.start()
        client = daemon.client(device_pool(8, seed=3))
        assert client.store(tokens_a, [0, 1, 2]).num_new_pages == 3
        assert client.store(tokens_b, [3, 4, 5]).num_new_pages == 3   # 4 slots: 2 of A go
        instance = daemon.stats()["instance"]
        client.close()
        messages = replay_all(replay, context)
    finally:
        assert daemon.stop() == 0
    seqs = [int.from_bytes(seq, "big") for _, seq, _ in messages]
    assert seqs == list(range(len(seqs)))
    batches = [decoder.decode(payload) for _, _, payload in messages]
    assert all(type(b) is kv_events.KVEventBatch and b.data_parallel_rank == 0 for b in batches)
    assert {msgpack.unpackb(payload)[3] for _, _, payload in messages} == {instance}
    flat = [e for b in batches for e in b.events]
    assert type(flat[0]) is kv_events.AllBlocksCleared   # seq 0 of an incarnation
    stored = [e for e in flat if type(e) is kv_events.BlockStored]
    assert [e.block_hashes for e in stored] == [keys_a, keys_b]
    assert [e.parent_block_hash for e in stored] == [None, None]
    assert {(e.medium, e.block_size, tuple(e.token_ids)) for e in stored} == {("CPU", P, ())}
    removed = [e for e in flat if type(e) is kv_events.BlockRemoved]
    assert [(e.block_hashes, e.medium) for e in removed] == [(keys_a[:2], "CPU")]
    # The live stream ends with the shutdown's clear, decoded the same way.
    # (An idle daemon's heartbeat is an empty batch, decoded the same way.)
    live = []
    while sub.poll(5_000):
        live.append(sub.recv_multipart())
        events_of_last = decoder.decode(live[-1][2]).events
        if events_of_last and type(events_of_last[-1]) is kv_events.AllBlocksCleared \
                and int.from_bytes(live[-1][1], "big") > seqs[-1]:
            break
    live_seqs = [int.from_bytes(seq, "big") for _, seq, _ in live]
    assert live and live_seqs[-1] > seqs[-1]
    assert live_seqs == list(range(live_seqs[0], live_seqs[0] + len(live)))   # no gap
    sub.close(linger=0)
    context.term()
