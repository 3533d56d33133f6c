"""A flood of Hello frames cannot lock real clients out (issue 16, item 4): sessions
that sent nothing after Hello live in a bounded pool of their own
(controller/daemon/admission.py), so after thousands of Hellos, from one socket and
from many, a real client attaches and works at once, and one attached before the
flood keeps working."""

import time

import zmq

from controller.daemon import protocol as p
from controller.daemon.admission import MAX_FRESH, MAX_PER_PEER, FreshSessions
from daemon_proc import LAYOUT, device_pool, running_daemon

TOKENS = list(range(16))


def _flood(address: str, num_sockets: int, hellos_each: int) -> int:
    """Send Hellos as fast as zmq takes them; wait for every reply; the number answered."""
    context = zmq.Context()
    socks = [context.socket(zmq.DEALER) for _ in range(num_sockets)]
    hello = p.Hello("flood", 1, LAYOUT.fingerprint(), b"", 0, 0)
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
        for i in range(hellos_each):
            for sock in socks:
                sock.send(p.encode(hello, i + 1, b""))
        answered, deadline = 0, time.monotonic() + 120
        for sock in socks:
            for _ in range(hellos_each):
                if not sock.poll(max(deadline - time.monotonic(), 0) * 1000):
                    return answered
                reply, _, _ = p.decode(sock.recv(), p.REPLIES)
                answered += type(reply) is p.HelloReply
        return answered
    finally:
        for sock in socks:
            sock.close(0)
        context.term()


def test_hello_flood_does_not_lock_out_real_clients(tmp_path):
    with running_daemon(tmp_path, host_pages=64) as daemon:
        before = daemon.client(device_pool(seed=1), request_timeout_s=5.0)
        before.store(TOKENS, [0, 1, 2, 3])
        # from one socket, then from many: each Hello answered, the fresh pool churns
        assert _flood(daemon.address, 1, 3000) == 3000
        assert _flood(daemon.address, 100, 30) == 3000
        start = time.monotonic()
        client = daemon.client(device_pool(seed=2), request_timeout_s=5.0)
        try:
            result = client.lookup(TOKENS)
            assert result.num_hit_pages == 4
            client.release(result)
            assert client.store(list(range(100, 116)), [0, 1, 2, 3]).num_new_pages == 4
            assert time.monotonic() - start < 5.0
            assert before.lookup(TOKENS).num_hit_pages == 4   # attached before: unharmed
            stats = client.daemon_stats()
            assert stats["num_fresh_clients"] <= MAX_FRESH
            assert stats["num_clients"] <= MAX_FRESH + 3
            assert stats["num_evicted_fresh_clients"] >= 6000 - MAX_FRESH
        finally:
            client.close()
            before.close()
        daemon.check_integrity(quiescent=True)


def test_fresh_pool_bounds():
    fresh = FreshSessions(max_fresh=4, max_per_peer=2)
    live = set()

    def hello(sid: bytes, peer: bytes) -> list[bytes]:
        live.add(sid)
        evicted = fresh.add(sid, peer, live)
        live.difference_update(evicted)
        return evicted

    assert hello(b"a1", b"A") == [] and hello(b"a2", b"A") == []
    assert hello(b"a3", b"A") == [b"a1"]                  # per peer: its own oldest
    assert hello(b"b1", b"B") == [] and hello(b"c1", b"C") == []
    assert hello(b"d1", b"D") == [b"a2"]                  # in all: the oldest
    fresh.graduate(b"b1")                                 # it sent a request: established
    assert len(fresh) == 3 and hello(b"e1", b"E") == []
    live.discard(b"c1")                                   # ended otherwise (Goodbye, reaped)
    assert hello(b"f1", b"F") == []                       # pruned, not evicted
    assert fresh.num_evicted == 2 and MAX_PER_PEER >= 2
