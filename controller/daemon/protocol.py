"""The daemon's wire protocol: every message, its type id, and strict msgpack framing.

One frame is one msgpack array; nothing else (no pickle, no ext types)::

    request: [VERSION, type_id, request_id, session, *fields]    session: 16 bytes, b"" before Hello
    reply:   [VERSION, type_id, request_id, instance, *fields]   instance: the daemon's 16-byte start id

Only page keys, slot numbers, lease and reservation ids cross the socket: the
client computes keys (tokens stay in the engine) and moves page bytes itself
through the shared-memory segment named in HelloReply. Key lists travel as one
blob of ``16 * n`` bytes and slot lists as little-endian uint32 blobs, so a
2,048-page request is a handful of msgpack objects, not thousands.

``decode`` checks the version, the type id, the field count and every field's
type and size before a message object exists; anything else raises
ProtocolError (the daemon answers it with an ErrorReply and goes on).
Both sides import this module; the client never imports the daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import msgpack
import numpy as np

VERSION = 5
"""3: Hello names the client process (start time, pid namespace); lookups and store
plans carry the slots' generations (slot fencing). 4: Lookup.follows (a look-again
after waiting on L3 is counted with the lookup it completes). 5: Hello carries the
layout itself (the daemon builds a pool per tenant and layout) and a credentials
ticket; HelloReply names the tenant and hands the segment over as a file descriptor
(a one-time secret redeemed on the daemon's side socket)."""
KEY_BYTES = 16
ID_BYTES = 16
MAX_KEYS = 32768
"""Most page keys in one request (512K tokens of 16-token pages)."""
MAX_FRAME_BYTES = MAX_KEYS * KEY_BYTES + 4096
"""Largest frame either side accepts; a larger one is refused before it is parsed."""
_MAX_STR = 1024
_MAX_STATS = 256
_U64 = (1 << 64) - 1
_SLOT_DTYPE = SLOT_DTYPE = np.dtype("<u4")   # slots and generations on the wire


class ProtocolError(ValueError):
    """A frame is not a valid message; ``code`` names the kind of fault for the reply."""

    def __init__(self, message: str, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code


# ---- field checkers: value -> value, or raise ProtocolError --------------------------
Check = Callable[[Any], Any]


def _uint(bits: int) -> Check:
    top = (1 << bits) - 1

    def check(v: Any) -> int:
        if type(v) is not int or not 0 <= v <= top:
            raise ProtocolError(f"expected a uint{bits}, got {_short(v)}")
        return v
    return check


def _str(max_len: int = _MAX_STR) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str or len(v) > max_len:
            raise ProtocolError(f"expected a str of at most {max_len} chars, got {_short(v)}")
        return v
    return check


def _bytes(max_len: int, exact: int | None = None) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes or len(v) > max_len or (exact is not None and len(v) != exact):
            size = f"exactly {exact}" if exact is not None else f"at most {max_len}"
            raise ProtocolError(f"expected {size} bytes, got {_short(v)}")
        return v
    return check


def _opt_id(v: Any) -> bytes:
    if type(v) is not bytes or len(v) not in (0, ID_BYTES):
        raise ProtocolError(f"expected b'' or {ID_BYTES} bytes, got {_short(v)}")
    return v


def _key_blob(v: Any) -> bytes:
    if type(v) is not bytes or len(v) % KEY_BYTES:
        raise ProtocolError(f"keys must be bytes of 16 * n, got {_short(v)}")
    if len(v) > MAX_KEYS * KEY_BYTES:
        raise ProtocolError(f"at most {MAX_KEYS} keys per request, got {len(v) // KEY_BYTES}",
                            "too_large")
    return v


def _slot_blob(v: Any) -> bytes:
    if type(v) is not bytes or len(v) % 4 or len(v) > MAX_KEYS * 4:
        raise ProtocolError(f"slot lists must be bytes of 4 * n (n <= {MAX_KEYS}), got {_short(v)}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ProtocolError(f"expected a bool, got {_short(v)}")
    return v


def _seconds(v: Any) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= 1e6:
        raise ProtocolError(f"expected seconds in [0, 1e6], got {_short(v)}")
    return float(v)


MAX_LAYOUT = {"num_layers": 4096, "num_kv_heads": 4096, "head_dim": 65536, "page_size": 65536}
"""Bounds of a layout a client may ask a daemon to build (each field; the page's byte
size is bounded by the daemon's budget too)."""
LAYOUT_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "uint8", "int8")


def _layout_spec(v: Any) -> tuple:
    """A layout as [num_layers, num_kv_heads, head_dim, page_size, dtype, is_mla], or []
    (a session that only asks for stats)."""
    if type(v) is not list or len(v) not in (0, 6):
        raise ProtocolError(f"layout must be [] or [layers, heads, head_dim, page_size, dtype, "
                            f"is_mla], got {_short(v)}")
    if not v:
        return ()
    for value, (name, top) in zip(v[:4], MAX_LAYOUT.items()):
        if type(value) is not int or not 0 < value <= top:
            raise ProtocolError(f"layout {name} must be an int in 1..{top}, got {_short(value)}")
    if type(v[4]) is not str or v[4] not in LAYOUT_DTYPES:
        raise ProtocolError(f"layout dtype must be one of {LAYOUT_DTYPES}, got {_short(v[4])}")
    if type(v[5]) is not bool:
        raise ProtocolError(f"layout is_mla must be a bool, got {_short(v[5])}")
    return tuple(v)


def layout_spec(layout: Any) -> tuple:
    """The Hello ``layout`` field of a KVLayout (kvstore.layout)."""
    return (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.page_size,
            layout.dtype, layout.is_mla)


def _stats_map(v: Any) -> dict[str, int | float | str]:
    if type(v) is not dict or len(v) > _MAX_STATS:
        raise ProtocolError(f"stats must be a map of at most {_MAX_STATS} entries")
    for k, x in v.items():
        if type(k) is not str or len(k) > 128 or type(x) not in (int, float, str):
            raise ProtocolError(f"bad stats entry {_short(k)}: {_short(x)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


u32, u64, text, secret = _uint(32), _uint(64), _str(), _bytes(256)


# ---- messages ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``SPEC`` checks each field, in field order."""

    TYPE: ClassVar[int]
    SPEC: ClassVar[tuple[Check, ...]]


# Requests (client -> daemon) ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Open a session. ``layout`` is the client's KV layout (``layout_spec``; [] for a
    stats-only session) and ``layout_fingerprint`` its fingerprint (both must agree);
    ``token`` is the shared secret on tcp, or a tenant's token (b"" otherwise).
    ``ticket`` (16 bytes, ipc) is what the daemon's side socket gave this client for
    its verified uid (b"" where there is none: tcp, a legacy daemon). ``pins_memory``:
    the client will pin the segment for device copies (the daemon then stops giving
    freed slots' memory back in that pool: see HostPool.returns_memory).
    (pid, pid_start_ticks, pid_namespace) name the client process
    (``controller.process_identity``): a daemon that can verify them keeps a silent
    client's slots while that process lives, rather than reusing them."""
    TYPE = 1
    client_name: str
    pid: int
    layout_fingerprint: str
    token: bytes
    pid_start_ticks: int
    pid_namespace: int
    layout: tuple = ()
    ticket: bytes = b""
    pins_memory: bool = False
    SPEC = (text, u32, text, secret, u64, u64, _layout_spec, _opt_id, _bool)


@dataclass(frozen=True, slots=True)
class Lookup(Message):
    """Lease the longest cached prefix of a chain of keys. The daemon never waits on L3
    here: pages only in L3 come up by a prefetch (started unless ``start_prefetch`` is
    False), which the client may wait for with WaitPrefetch and then look up again.

    ``follows`` is 0 for a new lookup. A look-again after waiting names the prefetch id
    of the lookup it completes: the two are counted as one lookup, and pages hit beyond
    the first one's hit count as L3 hits (they came up by that prefetch)."""
    TYPE = 2
    keys: bytes
    start_prefetch: bool
    follows: int = 0
    SPEC = (_key_blob, _bool, u64)


@dataclass(frozen=True, slots=True)
class Release(Message):
    """End a lease taken by Lookup. Releasing an unknown lease is not an error."""
    TYPE = 3
    lease_id: int
    SPEC = (u64,)


@dataclass(frozen=True, slots=True)
class BeginStore(Message):
    """Reserve slots for the absent pages of a chain of keys (phase one of a store)."""
    TYPE = 4
    keys: bytes
    SPEC = (_key_blob,)


@dataclass(frozen=True, slots=True)
class CommitStore(Message):
    """Publish a reservation whose slots the client has written (phase two)."""
    TYPE = 5
    reservation_id: int
    SPEC = (u64,)


@dataclass(frozen=True, slots=True)
class AbortStore(Message):
    """Give back a reservation's slots unpublished."""
    TYPE = 6
    reservation_id: int
    SPEC = (u64,)


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """The session is alive; its leases and reservations stay."""
    TYPE = 7
    SPEC = ()


@dataclass(frozen=True, slots=True)
class GetStats(Message):
    """Counters of the daemon and its cache."""
    TYPE = 8
    SPEC = ()


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Close the session: its leases end and its reservations are aborted."""
    TYPE = 9
    SPEC = ()


@dataclass(frozen=True, slots=True)
class CheckIntegrity(Message):
    """Run the cache's integrity check (``quiescent``: nothing may be leased or reserved)."""
    TYPE = 10
    quiescent: bool
    SPEC = (_bool,)


@dataclass(frozen=True, slots=True)
class StartPrefetch(Message):
    """Start bringing the L3 pages of a chain into L2 (a hint); answered with PrefetchReply."""
    TYPE = 12
    keys: bytes
    SPEC = (_key_blob,)


@dataclass(frozen=True, slots=True)
class WaitPrefetch(Message):
    """Answered (with PrefetchReply) once the prefetch is done or ``timeout_s`` passed;
    the daemon goes on serving others meanwhile."""
    TYPE = 13
    prefetch_id: int
    timeout_s: float
    SPEC = (u64, _seconds)


@dataclass(frozen=True, slots=True)
class CancelPrefetch(Message):
    """Stop a prefetch; its reserved slots go back once the read in flight has stopped."""
    TYPE = 14
    prefetch_id: int
    SPEC = (u64,)


@dataclass(frozen=True, slots=True)
class CountLoads(Message):
    """What a client's lookups handed its engine since its last CountLoads: pages to load
    that were in L2, that came up from L3, and hit pages its ``auto`` cost model chose to
    recompute (the client chooses, so only it can count). Answered with OkReply."""
    TYPE = 15
    num_l2: int
    num_l3: int
    num_recomputed: int
    SPEC = (u32, u32, u32)


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Is a daemon listening here? Needs no session (what ``kvstore status`` and a
    starting daemon send)."""
    TYPE = 11
    SPEC = ()


# Replies (daemon -> client) -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    """``segment_name``: the /dev/shm segment to map (a legacy daemon), or "" when the
    segment is handed over as a file descriptor: redeem ``fd_secret`` (once, within
    seconds) on the unix socket ``fd_socket``. ``tenant``: who the daemon took this
    client for. ``num_slots`` 0: a stats-only session."""
    TYPE = 64
    session: bytes
    segment_name: str
    num_slots: int
    slot_bytes: int
    layout_fingerprint: str
    lease_ttl_s: float
    heartbeat_interval_s: float
    reservation_ttl_s: float
    tenant: str = ""
    fd_secret: bytes = b""
    fd_socket: str = ""
    SPEC = (_bytes(ID_BYTES, ID_BYTES), text, u32, u64, text, _seconds, _seconds, _seconds, text,
            _opt_id, text)


@dataclass(frozen=True, slots=True)
class LookupReply(Message):
    """``slots[i]`` holds ``keys[i]`` for i < num_l2 + num_l3; lease 0 means nothing was hit.
    ``generations[i]`` is the generation of ``slots[i]`` as leased: the client checks it
    after copying (kvstore.slot_fence). ``num_pending`` pages after the hit are still
    coming up from L3 by prefetch ``prefetch_id`` (0: none)."""
    TYPE = 65
    lease_id: int
    num_l2: int
    num_l3: int
    slots: bytes
    num_pending: int
    prefetch_id: int
    generations: bytes
    SPEC = (u64, u32, u32, _slot_blob, u32, u64, _slot_blob)


@dataclass(frozen=True, slots=True)
class PrefetchReply(Message):
    """Progress of a prefetch (id 0: nothing to bring up, done)."""
    TYPE = 71
    prefetch_id: int
    num_pages: int
    num_ready: int
    num_failed: int
    num_pending: int
    is_done: bool
    SPEC = (u64, u32, u32, u32, u32, _bool)


@dataclass(frozen=True, slots=True)
class StorePlanReply(Message):
    """Write ``keys[positions[i]]`` into ``slots[i]``, then CommitStore(reservation_id);
    reservation 0 means there is nothing to write. ``generations[i]``: that of
    ``slots[i]`` as reserved (checked by the writer after its copy)."""
    TYPE = 66
    reservation_id: int
    positions: bytes
    slots: bytes
    num_skipped: int
    generations: bytes
    SPEC = (u64, _slot_blob, _slot_blob, u32, _slot_blob)


@dataclass(frozen=True, slots=True)
class CommitReply(Message):
    TYPE = 67
    num_published: int
    SPEC = (u32,)


@dataclass(frozen=True, slots=True)
class OkReply(Message):
    TYPE = 68
    SPEC = ()


@dataclass(frozen=True, slots=True)
class StatsReply(Message):
    TYPE = 69
    stats: dict
    SPEC = (_stats_map,)


@dataclass(frozen=True, slots=True)
class PongReply(Message):
    TYPE = 70
    pid: int
    segment_name: str
    layout_fingerprint: str
    SPEC = (u32, text, text)


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A refused request. ``code``: bad_message, too_large, unauthorized, unknown_session,
    bad_layout, unknown_lease, unknown_reservation, limit, integrity, internal."""
    TYPE = 127
    code: str
    message: str
    SPEC = (_str(64), text)


REQUESTS: dict[int, type[Message]] = {m.TYPE: m for m in (
    Hello, Lookup, Release, BeginStore, CommitStore, AbortStore, Heartbeat, GetStats,
    Goodbye, CheckIntegrity, Ping, StartPrefetch, WaitPrefetch, CancelPrefetch, CountLoads)}
REPLIES: dict[int, type[Message]] = {m.TYPE: m for m in (
    HelloReply, LookupReply, StorePlanReply, CommitReply, OkReply, StatsReply, PongReply,
    PrefetchReply, ErrorReply)}


# ---- framing -------------------------------------------------------------------------
def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def encode(msg: Message, request_id: int, header_id: bytes) -> bytes:
    """One frame: ``header_id`` is the session (requests) or the instance (replies)."""
    return msgpack.packb([VERSION, msg.TYPE, request_id, header_id,
                          *(getattr(msg, f.name) for f in fields(msg))], use_bin_type=True)


def decode(frame: bytes, table: dict[int, type[Message]]) -> tuple[Message, int, bytes]:
    """(message, request_id, header id) of a frame, every field checked; raises ProtocolError."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}", "too_large")
    try:
        obj = msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext,
            max_bin_len=MAX_FRAME_BYTES, max_str_len=_MAX_STR * 4, max_array_len=64,
            max_map_len=_MAX_STATS, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise ProtocolError(f"not a msgpack frame: {type(exc).__name__}: {exc}"[:200]) from None
    if type(obj) is not list or len(obj) < 4:
        raise ProtocolError("a frame must be an array [version, type, request_id, id, ...]")
    version, type_id, request_id, header_id, *values = obj
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"protocol version {_short(version)} is not {VERSION}: client and "
                            "daemon must come from the same kvstore release; upgrade the older one",
                            "bad_version")
    cls = table.get(type_id) if type(type_id) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_short(type_id)}")
    if type(request_id) is not int or not 0 <= request_id <= _U64:
        raise ProtocolError(f"request_id must be a uint64, got {_short(request_id)}")
    if type(header_id) is not bytes or len(header_id) not in (0, ID_BYTES):
        raise ProtocolError(f"session/instance id must be 0 or {ID_BYTES} bytes")
    if len(values) != len(cls.SPEC):
        raise ProtocolError(f"{cls.__name__} takes {len(cls.SPEC)} fields, got {len(values)}")
    try:
        checked = [check(v) for check, v in zip(cls.SPEC, values)]
    except ProtocolError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}", exc.code) from None
    return cls(*checked), request_id, header_id


# ---- blobs ---------------------------------------------------------------------------
_KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")   # opaque 16-byte items: tolist() makes bytes, NULs kept


def split_keys(blob: bytes) -> list[bytes]:
    """A key blob as a list of 16-byte keys (made at C level in one call; no per-key
    checks needed: decode checked the blob's length)."""
    return np.frombuffer(blob, dtype=_KEY_DTYPE).tolist()


def join_keys(keys: list[bytes]) -> bytes:
    blob = b"".join(keys)
    if len(blob) != KEY_BYTES * len(keys):
        raise ValueError("every page key must be exactly 16 bytes")
    return blob


def pack_u32(values: list[int]) -> bytes:
    return np.asarray(values, dtype=_SLOT_DTYPE).tobytes()


def unpack_u32(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype=_SLOT_DTYPE).tolist()
