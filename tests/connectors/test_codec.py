"""The value frame: round trips for any bytes and dtype width, any corruption caught."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors import codec
from connectors.codec import CODECS, FingerprintMismatch, FrameError, SizeMismatch
from l3_util import bf16_page

FP = codec.fingerprint_digest("layout-a")
CODEC_IDS = st.sampled_from(sorted(CODECS.values()))
ELEM = st.sampled_from([1, 2, 3, 4, 8])
LIMIT = 1 << 20


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=5000), cid=CODEC_IDS, elem_size=ELEM)
def test_round_trip_any_bytes_any_dtype(raw, cid, elem_size):
    frame = codec.encode_frame(raw, cid, FP, elem_size)
    assert codec.decode(frame, FP, LIMIT) == raw
    out = bytearray(len(raw))
    codec.decode_into(frame, memoryview(out), FP, LIMIT)
    assert bytes(out) == raw


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=1, max_size=3000), cid=CODEC_IDS, elem_size=ELEM,
       pos=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_single_byte_corruption_is_detected(raw, cid, elem_size, pos, flip):
    frame = bytearray(codec.encode_frame(raw, cid, FP, elem_size))
    frame[pos % len(frame)] ^= flip
    with pytest.raises(FrameError):
        codec.decode(bytes(frame), FP, LIMIT)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=3000), cid=CODEC_IDS, cut=st.integers(min_value=1),
       extra=st.binary(min_size=1, max_size=20))
def test_truncated_or_extended_frames_are_detected(raw, cid, cut, extra):
    frame = codec.encode_frame(raw, cid, FP)
    with pytest.raises(FrameError):
        codec.decode(frame[: len(frame) - 1 - cut % len(frame)], FP, LIMIT)
    with pytest.raises(FrameError):
        codec.decode(frame + extra, FP, LIMIT)


@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_decode(data):
    with pytest.raises(FrameError):
        codec.decode(data, FP, LIMIT)


def test_fingerprint_size_and_limit_checks():
    frame = codec.encode_frame(b"x" * 100, CODECS["lz4"], FP)
    with pytest.raises(FingerprintMismatch):
        codec.decode(frame, codec.fingerprint_digest("layout-b"), LIMIT)
    with pytest.raises(SizeMismatch):
        codec.decode_into(frame, memoryview(bytearray(99)), FP, LIMIT)
    with pytest.raises(FrameError, match="limit"):
        codec.decode(frame, FP, 99)


def test_forged_zstd_content_size_is_refused():
    """A frame with a valid checksum whose zstd header claims more than raw_len."""
    raw = b"a" * 1000
    head = codec.encode(raw, CODECS["zstd"], FP).head
    other = codec.encode_frame(b"a" * 2000, CODECS["zstd"], FP)
    forged_payload = other[codec.HEADER_LEN:]
    forged = bytearray(head[:8]) + len(raw).to_bytes(8, "little") + \
        len(forged_payload).to_bytes(8, "little") + FP + codec.key_digest(b"").to_bytes(8, "little")
    forged += b"\0" * 8
    frame = bytes(forged[:40]) + codec.checksum(forged, forged_payload).to_bytes(8, "little") \
        + bytes(forged_payload)
    with pytest.raises(FrameError, match="content size"):
        codec.decode(frame, FP, LIMIT)


@pytest.mark.parametrize("name", ["shuffle_lz4", "zstd", "shuffle_zstd"])
def test_bf16_kv_like_pages_compress(name):
    page = bf16_page(256 * 1024, seed=3)
    frame = codec.encode_frame(page, CODECS[name], FP, 2)
    assert len(frame) < len(page)
    assert codec.decode(frame, FP, LIMIT) == page


def test_codec_none_is_header_plus_page():
    page = os.urandom(1000)
    frame = codec.encode_frame(page, CODECS["none"], FP)
    assert len(frame) == codec.HEADER_LEN + 1000 and frame[codec.HEADER_LEN:] == page
