"""fp8 L3 copies: the encoding's error bound, the version 3 frame and its checks, and
connectors that store fp8 (half the bytes; a frame of the other encoding is a counted miss)."""

from __future__ import annotations

import asyncio
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors import ConnectorError, codec, fp8, open_connector
from connectors.codec import CODECS, ENCODINGS, EncodingMismatch, FrameError

FP = codec.fingerprint_digest("layout-a")
LIMIT = 1 << 24
FP8 = ENCODINGS["fp8_e4m3"]


def bf16_groups(num_groups: int, group_elems: int, seed: int = 0) -> torch.Tensor:
    """bf16 values of very different sizes per group (KV's layers and K/V differ so)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, 3, num_groups)[:, None]
    return (torch.randn(num_groups, group_elems, generator=gen) * scales).to(torch.bfloat16)


def raw_of(x: torch.Tensor) -> memoryview:
    return memoryview(x.contiguous().view(torch.int16).numpy()).cast("B")


def decoded(payload: bytes, like: torch.Tensor) -> torch.Tensor:
    out = bytearray(like.numel() * 2)
    fp8.decode_into(payload, memoryview(out))
    return torch.frombuffer(out, dtype=torch.bfloat16).view(like.shape)


def error_bound(x: torch.Tensor, payload: bytes) -> torch.Tensor:
    """Round to nearest in e4m3 after scaling by 2**-k: within 2**-4 of |x| in the normal
    range, within half the smallest subnormal step (2**(k-10)) below it."""
    exps = torch.tensor(np.frombuffer(payload, np.int8, x.shape[0], fp8.DESCRIPTOR_LEN).astype(np.float32))
    return torch.maximum(x.float().abs() * 2.0**-4, torch.exp2(exps - 10)[:, None])


def test_round_trip_is_within_the_e4m3_bound_and_half_the_bytes():
    x = bf16_groups(16, 4096)
    payload = fp8.encode(raw_of(x), 4096)
    assert len(payload) == fp8.payload_len(x.numel() * 2, 4096) == 16 + 16 + x.numel()
    y = decoded(payload, x)
    assert bool(((y.float() - x.float()).abs() <= error_bound(x, payload)).all())
    # and not trivially: most elements moved, by about the e4m3 rounding
    rel = ((y.float() - x.float()).abs() / x.float().abs().clamp_min(1e-30)).median()
    assert 1e-3 < float(rel) < 2**-4


@settings(max_examples=60, deadline=None)
@given(num_groups=st.integers(1, 6), half=st.integers(1, 40), seed=st.integers(0, 2**16),
       log_scale=st.floats(-30, 30))
def test_any_finite_page_round_trips_within_the_bound(num_groups, half, seed, log_scale):
    x = (bf16_groups(num_groups, 2 * half, seed).float() * 2.0**log_scale).to(torch.bfloat16)
    payload = fp8.encode(raw_of(x), 2 * half)
    y = decoded(payload, x)
    assert bool(((y.float() - x.float()).abs() <= error_bound(x, payload)).all())


def test_fp8_values_zeros_and_group_maxima_are_exact():
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    exact = values[values.isfinite()].to(torch.bfloat16)          # every finite e4m3 value
    x = torch.cat([exact, torch.zeros(exact.numel())]).view(2, -1).to(torch.bfloat16)
    x[1] = 0
    assert torch.equal(decoded(fp8.encode(raw_of(x), x.shape[1]), x), x)


def test_a_page_with_nan_or_inf_is_refused():
    for bad in (float("nan"), float("inf")):
        x = bf16_groups(2, 64)
        x[1, 5] = bad
        with pytest.raises(fp8.UnencodablePage):
            fp8.encode(raw_of(x), 64)


# ---- frames --------------------------------------------------------------------------
def fp8_frame(x: torch.Tensor, key: bytes = b"k", group: int = 64) -> bytes:
    return codec.encode_frame(raw_of(x), CODECS["none"], FP, key=key, encoding=FP8, group_elems=group)


def test_frames_name_their_encoding_and_old_frames_still_read():
    x = bf16_groups(4, 64)
    lossless = codec.encode_frame(raw_of(x), CODECS["none"], FP, key=b"k")
    assert lossless[4] == codec.FORMAT_VERSION == 2          # what readers before fp8 wrote
    assert codec.decode(lossless, FP, LIMIT, b"k") == bytes(raw_of(x))
    frame = fp8_frame(x)
    assert frame[4] == codec.ENCODED_FORMAT_VERSION and frame[codec.HEADER_LEN] == FP8
    got = torch.frombuffer(bytearray(codec.decode(frame, FP, LIMIT, b"k", FP8)), dtype=torch.bfloat16)
    assert torch.equal(got.view(x.shape), decoded(bytes(frame[codec.HEADER_LEN:]), x))


def test_a_frame_of_the_other_encoding_is_never_decoded():
    x = bf16_groups(4, 64)
    out = memoryview(bytearray(x.numel() * 2))
    with pytest.raises(EncodingMismatch):
        codec.decode_into(fp8_frame(x), out, FP, LIMIT, b"k")                 # lossless reader
    lossless = codec.encode_frame(raw_of(x), CODECS["none"], FP, key=b"k")
    with pytest.raises(EncodingMismatch):
        codec.decode_into(lossless, out, FP, LIMIT, b"k", FP8)               # fp8 reader


def resealed(frame: bytearray) -> bytes:
    """The frame with a fresh checksum: a forged value that passes the integrity check."""
    head = bytes(frame[:codec.HEADER_LEN])
    frame[codec.HEADER_LEN - 8:codec.HEADER_LEN] = codec.checksum(head, bytes(frame[codec.HEADER_LEN:])).to_bytes(8, "little")
    return bytes(frame)


@pytest.mark.parametrize("offset, value", [
    (4, 7),        # group count
    (8, 62),       # group size
    (1, 2),        # source dtype
    (2, 1),        # reserved
    (16, 120),     # a scale exponent out of range
])
def test_a_forged_descriptor_is_a_frame_error(offset, value):
    frame = bytearray(fp8_frame(bf16_groups(4, 64)))
    frame[codec.HEADER_LEN + offset] = value
    with pytest.raises(FrameError):
        codec.decode(resealed(frame), FP, LIMIT, b"k", FP8)


def test_corruption_truncation_and_a_compressed_encoded_frame_are_caught():
    frame = bytearray(fp8_frame(bf16_groups(4, 64)))
    for bad in (frame[:-1], frame[:codec.HEADER_LEN + 3]):
        with pytest.raises(FrameError):
            codec.decode(bytes(bad), FP, LIMIT, b"k", FP8)
    flipped = bytearray(frame)
    flipped[-5] ^= 0x40
    with pytest.raises(FrameError, match="checksum"):
        codec.decode(bytes(flipped), FP, LIMIT, b"k", FP8)
    zstd = bytearray(frame)
    zstd[5] = CODECS["zstd"]
    with pytest.raises(FrameError, match="compressing codec"):
        codec.decode(resealed(zstd), FP, LIMIT, b"k", FP8)
    with pytest.raises(ValueError, match="codec none"):
        codec.encode_frame(raw_of(bf16_groups(1, 64)), CODECS["zstd"], FP, encoding=FP8, group_elems=64)


def test_an_encoded_payload_read_in_place_is_decoded_from_a_copy():
    """A backend reads a payload of the page's length straight into the page buffer (disk,
    codec none). A tiny fp8 frame can have that length (one group of 24: 16 + 8 + 24 = 48
    bytes = the page); decoding must not read what it overwrites."""
    x = bf16_groups(1, 24)
    frame = fp8_frame(x, group=24)
    payload = bytes(frame[codec.HEADER_LEN:])
    assert len(payload) == x.numel() * 2
    page = bytearray(payload)                   # the buffer holds the payload, as read
    view = memoryview(page)
    codec.decode_parts_into(frame[:codec.HEADER_LEN], view, view, FP, LIMIT, b"k", FP8)
    assert torch.equal(torch.frombuffer(page, dtype=torch.bfloat16).view(x.shape), decoded(payload, x))


# ---- connectors ----------------------------------------------------------------------
def pages(n: int, group: int = 1024, num_groups: int = 4) -> list[bytes]:
    return [bytes(raw_of(bf16_groups(num_groups, group, seed=i))) for i in range(n)]


def keys_of(n: int) -> list[bytes]:
    return [b"key-%03d" % i for i in range(n)]


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_an_fp8_connector_stores_half_the_bytes_and_reads_close_pages(backend, tmp_path):
    opts = {"shared_name": "fp8-half"} if backend == "memory" else {
        "path": str(tmp_path / "l3"), "capacity_bytes": 1 << 26}

    async def scenario():
        conn = open_connector(backend, fingerprint="fp", encoding="fp8_e4m3",
                              encoding_group_elems=1024, **opts)
        data, ks = pages(6), keys_of(6)
        assert await conn.put(ks, data) == [True] * 6
        bufs = [bytearray(len(p)) for p in data]
        assert await conn.get_into(ks, [memoryview(b) for b in bufs]) == [True] * 6
        got = await conn.get(ks)
        st = conn.stats()
        await conn.close()
        return data, bufs, got, st

    data, bufs, got, st = asyncio.run(scenario())
    for page, buf, whole in zip(data, bufs, got):
        x = torch.frombuffer(bytearray(page), dtype=torch.bfloat16).view(4, 1024)
        y = torch.frombuffer(buf, dtype=torch.bfloat16).view(4, 1024)
        assert bytes(buf) == whole and bytes(buf) != page
        assert bool(((y.float() - x.float()).abs() <= x.float().abs() * 2**-4 + x.float().abs().amax() * 2**-9).all())
    ratio = st.bytes_out / st.raw_bytes_out
    assert 0.49 <= ratio <= 0.51, ratio
    if backend == "disk":
        files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "l3") for f in fs]
        sizes = sorted(os.path.getsize(f) for f in files if os.path.basename(f).startswith(b"key".hex()[:2]))
        assert sizes and all(size < len(data[0]) * 0.52 for size in sizes)


def test_readers_of_the_other_encoding_count_misses_and_keep_the_value():
    async def scenario():
        fp8_conn = open_connector("memory", shared_name="mixed", encoding="fp8_e4m3")
        plain = open_connector("memory", shared_name="mixed")
        ks, data = keys_of(2), pages(2)
        await fp8_conn.put(ks[:1], data[:1])
        await plain.put(ks[1:], data[1:])
        plain_got = await plain.get(ks)
        fp8_got = await fp8_conn.get(ks)
        again = await fp8_conn.get(ks[:1])          # not dropped: it is valid for fp8 readers
        return plain_got, fp8_got, again, plain.stats(), fp8_conn.stats()

    plain_got, fp8_got, again, plain_st, fp8_st = asyncio.run(scenario())
    assert plain_got[0] is None and plain_got[1] is not None
    assert fp8_got[0] is not None and fp8_got[1] is None and again[0] is not None
    assert (plain_st.wrong_encoding, fp8_st.wrong_encoding) == (1, 1)
    assert plain_st.corrupt == fp8_st.corrupt == 0


def test_an_unencodable_page_is_a_failed_put_and_the_others_are_stored():
    nan_page = bf16_groups(4, 1024)
    nan_page[2, 3] = float("nan")

    async def scenario():
        conn = open_connector("memory", encoding="fp8_e4m3", encoding_group_elems=1024)
        ok = await conn.put(keys_of(3), [pages(1)[0], bytes(raw_of(nan_page)), pages(2)[1]])
        return ok, conn.stats()

    ok, st = asyncio.run(scenario())
    assert ok == [True, False, True] and (st.puts, st.put_failures) == (2, 1)


@pytest.mark.parametrize("options, message", [
    ({"encoding": "fp4"}, "unknown encoding"),
    ({"encoding": "fp8_e4m3", "codec": "zstd"}, "codec none"),
    ({"encoding": "fp8_e4m3", "encoding_group_elems": 63}, "even"),
    ({"encoding": "fp8_e4m3", "elem_size": 4}, "bf16"),
])
def test_bad_encoding_options_are_refused(options, message):
    with pytest.raises(ConnectorError, match=message):
        open_connector("memory", **options)


def test_the_decode_table_is_the_exact_fp8_value_times_the_scale():
    for exp in (-20, 0, 7):
        table = fp8._pair_table(exp)
        b0, b1 = 0x3A, 0xC5
        pair = table[b1 << 8 | b0]
        lo, hi = struct.unpack("<HH", struct.pack("<I", int(pair)))
        as_float = lambda byte: torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float() * 2.0**exp
        assert torch.tensor([lo], dtype=torch.int16).view(torch.bfloat16).float() == as_float(b0)
        assert torch.tensor([hi - (1 << 16) if hi >= 1 << 15 else hi], dtype=torch.int16).view(torch.bfloat16).float() == as_float(b1)


def test_every_backend_round_trips_fp8_and_misses_the_other_encoding(make_conn):
    """The contract of an fp8 store on every backend: pages come back close, the bytes
    moved are half, and a lossless reader of the same store misses them (counted)."""
    data, ks = pages(3), keys_of(3)

    async def scenario():
        async with make_conn(encoding="fp8_e4m3", encoding_group_elems=1024) as conn:
            assert await conn.put(ks, data) == [True] * 3
            got = await conn.get(ks)
            bufs = [bytearray(len(p)) for p in data]
            into = await conn.get_into(ks, [memoryview(b) for b in bufs])
            st = conn.stats()
        async with make_conn() as plain:
            missed = await plain.get(ks)
            plain_st = plain.stats()
        return got, bufs, into, st, missed, plain_st

    got, bufs, into, st, missed, plain_st = asyncio.run(scenario())
    assert into == [True] * 3 and [bytes(b) for b in bufs] == got
    for page, value in zip(data, got):
        x = torch.frombuffer(bytearray(page), dtype=torch.bfloat16).float()
        y = torch.frombuffer(bytearray(value), dtype=torch.bfloat16).float()
        assert bool(((y - x).abs() <= x.abs() * 2**-4 + x.abs().amax() * 2**-9).all())
    assert 0.49 <= st.bytes_out / st.raw_bytes_out <= 0.51
    assert missed == [None] * 3 and plain_st.wrong_encoding == 3 and plain_st.corrupt == 0
