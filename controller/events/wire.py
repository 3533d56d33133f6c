"""The KV-event wire format: vLLM's (``vllm/distributed/kv_events.py``), written with msgpack.

One message on the PUB socket is three frames, as vLLM's ``ZmqEventPublisher`` sends::

    [topic, sequence number (8 bytes, big-endian), payload]

The payload is a msgpack array, vLLM's ``KVEventBatch`` (an ``array_like`` struct)
plus one element of ours that vLLM's decoder ignores::

    [ts (float, unix seconds), events (array), data_parallel_rank (int, 0),
     incarnation (str, 32 hex digits: the daemon's instance id, random per start)]

Each event is a msgpack map tagged by ``type`` (vLLM >= 0.11 encodes events as
maps; the ``type`` tag is msgspec's)::

    {"type": "BlockStored", "block_hashes": [bin16, ...], "parent_block_hash": bin16 | nil,
     "token_ids": [], "block_size": int, "lora_id": nil, "medium": "CPU" | "STORAGE",
     "lora_name": nil}
    {"type": "BlockRemoved", "block_hashes": [bin16, ...], "medium": "CPU" | "STORAGE"}
    {"type": "AllBlocksCleared"}

Block hashes are kvstore page keys (16 bytes, ``kvstore.page_keys.page_keys``):
a router computes the same ones from a prompt's tokens and the namespace
digest. ``token_ids`` is empty: the daemon sees keys, never tokens.

Replay (a ROUTER socket; vLLM's protocol): a DEALER sends ``[b"", start seq
(8 bytes big-endian)]`` and receives ``[b"", topic, seq, payload]`` for every
buffered batch from that seq on, then ``[b"", b"", END_SEQ, b""]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union

import msgpack

from kvstore.page_keys import KEY_BYTES, PageKey

MEDIUM_L2 = "CPU"
"""L2, the daemon's host pool (vLLM's MEDIUM_CPU)."""
MEDIUM_L3 = "STORAGE"
"""L3, the store behind it (vLLM's MEDIUM_STORAGE)."""
MEDIA = (MEDIUM_L2, MEDIUM_L3)
SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)
"""The replay's end marker (vLLM's ``ZmqEventPublisher.END_SEQ``)."""
MAX_PAYLOAD_BYTES = 64 << 20
"""A subscriber refuses larger payloads (network input: sizes are checked)."""
_MAX_ARRAY = 1 << 17
"""The most items in one array (a store of 131,072 pages is one event)."""


class EventFormatError(ValueError):
    """A message that is not a KV-event batch of this format; says what was wrong."""


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[PageKey, ...]
    parent_block_hash: PageKey | None
    medium: str
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[PageKey, ...]
    medium: str


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    incarnation: str
    """The publishing daemon's instance id (hex); a new one means the daemon restarted."""
    data_parallel_rank: int = 0


# ---- encode -------------------------------------------------------------------------------
def stored(keys: list[PageKey], parent: PageKey | None, medium: str, block_size: int) -> dict:
    return {"type": "BlockStored", "block_hashes": keys, "parent_block_hash": parent,
            "token_ids": [], "block_size": block_size, "lora_id": None, "medium": medium,
            "lora_name": None}


def removed(keys: list[PageKey], medium: str) -> dict:
    return {"type": "BlockRemoved", "block_hashes": keys, "medium": medium}


def cleared() -> dict:
    return {"type": "AllBlocksCleared"}


def encode_batch(events: list[dict], incarnation: str, ts: float | None = None) -> bytes:
    """One payload: the events (made by ``stored``/``removed``/``cleared``) as a batch."""
    return msgpack.packb([time.time() if ts is None else ts, events, 0, incarnation],
                         use_bin_type=True)


def seq_frame(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


# ---- decode (untrusted input: every type and size is checked) ---------------------------------
def parse_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise EventFormatError(f"a sequence frame has {SEQ_BYTES} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(payload: bytes) -> EventBatch:
    """A payload as an EventBatch; EventFormatError naming the first thing wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EventFormatError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        # Bounded before anything is built: a payload of nils must not become a list of
        # tens of millions of items; ext types are refused (no hook turns them into objects).
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                              max_bin_len=MAX_PAYLOAD_BYTES, max_str_len=1 << 20,
                              max_array_len=_MAX_ARRAY, max_map_len=16, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EventFormatError(f"payload is not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise EventFormatError("a batch is an array [ts, events, data_parallel_rank, incarnation]")
    ts, events = raw[0], raw[1]
    rank = raw[2] if len(raw) > 2 and raw[2] is not None else 0
    incarnation = raw[3] if len(raw) > 3 else ""
    if not isinstance(ts, (int, float)) or not isinstance(events, list) \
            or not isinstance(rank, int) or not isinstance(incarnation, str):
        raise EventFormatError("batch fields have the wrong types (float, array, int, str)")
    if incarnation and not _is_incarnation(incarnation):
        raise EventFormatError("the incarnation is 32 hex digits (the daemon's instance id)")
    return EventBatch(float(ts), tuple(_event(e) for e in events), incarnation, rank)


def _event(raw: object) -> Event:
    if not isinstance(raw, dict):
        raise EventFormatError(f"an event is a map with a 'type', got {type(raw).__name__}")
    kind = raw.get("type")
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    if kind not in ("BlockStored", "BlockRemoved"):
        raise EventFormatError(f"unknown event type {kind!r}")
    hashes = raw.get("block_hashes")
    medium = raw.get("medium")
    if not isinstance(hashes, list) or not all(_is_key(h) for h in hashes):
        raise EventFormatError(f"{kind}.block_hashes must be an array of {KEY_BYTES}-byte keys")
    if medium is not None and medium not in MEDIA:
        raise EventFormatError(f"{kind}.medium must be one of {MEDIA} or nil, got {medium!r}")
    if kind == "BlockRemoved":
        return BlockRemoved(tuple(hashes), medium or "")
    parent, size = raw.get("parent_block_hash"), raw.get("block_size")
    if parent is not None and not _is_key(parent) or type(size) is not int or size <= 0:
        raise EventFormatError("BlockStored.parent_block_hash must be a key or nil, "
                               "block_size a positive int")
    return BlockStored(tuple(hashes), parent, medium or "", size)


def _is_incarnation(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_BYTES
