"""Over 100,000 malformed or mutated frames against a live daemon; then it still serves
correct requests and its cache checks out.

Frames are sent in bulk (chunks of a few thousand, then their replies): every frame
must get exactly one reply, an ErrorReply for every bad one. Most frames come from a
seeded mutator over valid frames of every request type (fast, reproducible); a
smaller share (about 600) from hypothesis (derandomized) as arbitrary msgpack and bytes.
"""

import random

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.daemon import protocol as p

from daemon_proc import LAYOUT, device_pool, running_daemon
from daemon_worker import tokens

NUM_MUTATED = 100_000
CHUNK = 5_000


def valid_frames(session: bytes) -> list[bytes]:
    keys = p.join_keys([bytes([i]) * 16 for i in range(1, 9)])
    msgs = [p.Hello("fuzz", 1, LAYOUT.fingerprint(), b"", 0, 0), p.Lookup(keys, True), p.StartPrefetch(keys),
            p.WaitPrefetch(1, 0.0), p.CancelPrefetch(1), p.Release(1),
            p.BeginStore(keys), p.CommitStore(2), p.AbortStore(3), p.Heartbeat(), p.GetStats(),
            p.CheckIntegrity(False), p.Ping(), p.Lookup(b"", False)]
    return [p.encode(m, i + 1, b"" if type(m) in (p.Hello, p.Ping) else session)
            for i, m in enumerate(msgs)]


_JUNK = [None, True, -1, 2**64 - 1, 2**63, -(2**63), 1.5, float("nan"), "", "x" * 5000, b"", b"\0" * 17,
         [], {}, [1, [2, [3]]], {"a": 1}, {1: 2}]


def mutate(rng: random.Random, frame: bytes, templates: list[bytes]) -> bytes:
    kind = rng.randrange(9)
    data = bytearray(frame)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 2:  # append garbage
        data += rng.randbytes(rng.randint(1, 32))
    elif kind == 3:  # overwrite a run
        i = rng.randrange(len(data))
        data[i : i + 4] = rng.randbytes(4)
    elif kind == 4:  # splice two frames
        other = rng.choice(templates)
        data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]
    elif kind == 5:  # random bytes
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    else:  # structurally valid msgpack with a field swapped, added or dropped
        obj = msgpack.unpackb(frame)
        op = rng.randrange(3)
        if op == 0:
            obj[rng.randrange(len(obj))] = rng.choice(_JUNK)
        elif op == 1:
            obj.append(rng.choice(_JUNK))
        elif len(obj) > 1:
            del obj[rng.randrange(len(obj))]
        data = bytearray(msgpack.packb(obj))
    return bytes(data)


def blast(sock: zmq.Socket, frames: list) -> list[bytes]:
    """Send every frame (a bytes or a list of parts), then collect one reply each."""
    replies = []
    for start in range(0, len(frames), CHUNK):
        chunk = frames[start : start + CHUNK]
        for frame in chunk:
            if isinstance(frame, list):
                sock.send_multipart(frame)
            else:
                sock.send(frame)
        for _ in chunk:
            assert sock.poll(30_000), f"no reply after {len(replies)} frames"
            replies.append(sock.recv())
    return replies


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("fuzz"), host_pages=32) as daemon:
        session = daemon.session(request_timeout_s=5.0)
        hello = session.attach()
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.address)
        try:
            yield daemon, sock, hello.session
        finally:
            sock.close(0)
            context.term()
            session.close()


def test_100k_mutated_frames_then_correct_requests(fuzzed):
    daemon, sock, session = fuzzed
    rng = random.Random(20240601)
    templates = valid_frames(session)
    frames: list = [mutate(rng, rng.choice(templates), templates) for _ in range(NUM_MUTATED)]
    frames += [b"", [b"a", b"b"], [b"", b"", b""], b"\x91" * 100, b"\xc1",
               p.encode(p.Lookup(b"\0" * 16 * (p.MAX_KEYS + 1), True), 9, session),  # too many keys
               b"\x92" + msgpack.packb(b"x" * (p.MAX_FRAME_BYTES + 10))]  # oversized frame
    replies = blast(sock, frames)
    assert len(replies) == len(frames)
    decoded = [p.decode(r, p.REPLIES)[0] for r in replies]
    errors = [m for m in decoded if type(m) is p.ErrorReply]
    assert len(errors) > 0.8 * len(frames)
    assert {"bad_message", "too_large", "unknown_session"} <= {e.code for e in errors}
    assert not [e for e in errors if e.code == "internal"], [e for e in errors if e.code == "internal"][:3]
    stats = daemon.stats()
    assert stats["num_bad_messages"] >= 0.5 * len(frames)
    _then_correct_requests(daemon, sock, session)


def _then_correct_requests(daemon, sock, session):
    # The fuzz session may hold leases or reservations its frames made: end it.
    sock.send(p.encode(p.Goodbye(), 1, session))
    assert sock.poll(10_000)
    sock.recv()
    daemon.check_integrity()
    with daemon.client(device_pool(16, seed=11)) as cache:
        assert cache.store(tokens(11, 4), range(4)).num_new_pages == 4
        result = cache.lookup(tokens(11, 4))
        assert result.num_hit_pages == 4
        cache.load(result, range(8, 12)).wait_all()
        cache.release(result)
    daemon.check_integrity(quiescent=True)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)
_frame = st.one_of(
    st.binary(max_size=80),
    _values.map(lambda v: msgpack.packb(v)),
    st.tuples(st.sampled_from(sorted(p.REQUESTS)), st.integers(0, 2**64 - 1),
              st.lists(_values, max_size=6)).map(
        lambda t: msgpack.packb([p.VERSION, t[0], t[1], b"", *t[2]])),
)


@settings(derandomize=True, max_examples=30, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(_frame, min_size=10, max_size=30))
def test_hypothesis_frames_get_one_reply_each(fuzzed, frames):
    daemon, sock, session = fuzzed
    replies = blast(sock, frames)
    assert len(replies) == len(frames)
    for reply in replies:
        msg, _, _ = p.decode(reply, p.REPLIES)
        assert not (type(msg) is p.ErrorReply and msg.code == "internal"), msg


def test_daemon_is_healthy_after_hypothesis(fuzzed):
    daemon, sock, session = fuzzed
    daemon.check_integrity()
    with daemon.client(device_pool(16, seed=12)) as cache:
        assert cache.store(tokens(12, 3), range(3)).num_new_pages == 3
        cache.release(cache.lookup(tokens(12, 3)))
