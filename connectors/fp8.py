"""fp8 (e4m3) copies of bf16 pages: the payload of an encoded L3 frame (codec.py, version 3).

This encoding is LOSSY: a page read back is close to the stored one, not equal (e4m3 keeps
3 mantissa bits: each element within 2**-4 of its value relative to itself, flushed to a
multiple of the group's smallest step below it). It is opt-in per L3 config.

Payload layout (little-endian)::

    offset  size         field
    0       1            encoding id (1 = fp8_e4m3)
    1       1            source dtype (1 = bfloat16)
    2       2            reserved (0)
    4       4            num_groups G
    8       4            group_elems E: elements that share one scale (E even)
    12      4            reserved (0)
    16      G            scale exponents, int8: group g holds values / 2**exp[g]
    16+pad8(G) G*E       the elements, fp8 e4m3fn, in page order

so the page is G*E bf16 elements (the frame's raw length is 2*G*E). The kvstore core
makes a group one page of one layer's K or V (KVLayout.chunk_numel): keys and values,
and layers, get scales of their own.

Why power-of-two scales: x * 2**-k is exact in bf16/float32, so the only rounding is the
fp8 cast, and decoding is a table lookup. Decoding runs on the host, on the connector's
worker threads, when a page arrives in L2 (L2 and the engine's pool stay bf16, so the copy
kernels and the slot format do not change); numpy has no fp8 type and torch's CPU cast
runs at ~0.1 GB/s, so two fp8 bytes at a time are looked up in a 65,536-entry table of
the two bf16 values they stand for (one table per exponent, cached).
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import torch

ENCODING_FP8_E4M3 = 1
SOURCE_BFLOAT16 = 1
FP8_MAX = 448.0                 # largest finite e4m3fn value
_DESCRIPTOR = struct.Struct("<BBHIII")
DESCRIPTOR_LEN = _DESCRIPTOR.size   # 16
_EXP_RANGE = (-100, 100)
_SLICE_PAIRS = 1 << 14          # decode in slices that stay in cache (measured best)


class UnencodablePage(ValueError):
    """The page holds a NaN or an infinity, which fp8 with a finite scale cannot carry."""


class BadPayload(ValueError):
    """An fp8 payload whose descriptor or length does not fit its frame."""


def payload_len(raw_len: int, group_elems: int) -> int:
    """Bytes of the payload of a bf16 page of ``raw_len`` bytes."""
    num_groups = raw_len // 2 // group_elems
    return DESCRIPTOR_LEN + _pad8(num_groups) + num_groups * group_elems


def encode(raw: memoryview, group_elems: int) -> bytes:
    """The fp8 payload of one bf16 page (``raw``: 2 * G * group_elems bytes).

    Raises UnencodablePage for a page with non-finite values, ValueError for a length that
    is not whole groups."""
    if group_elems <= 0 or group_elems % 2 or len(raw) % (2 * group_elems):
        raise ValueError(f"a page of {len(raw)} bytes is not whole groups of {group_elems} bf16 elements")
    x = torch.frombuffer(raw, dtype=torch.bfloat16).view(-1, group_elems)
    amax = x.abs().amax(dim=1).float()
    if not bool(torch.isfinite(amax).all()):
        raise UnencodablePage("page holds NaN or infinity")
    exps = _exponents(amax)
    scaled = x.float().mul_(torch.exp2(-exps.float())[:, None])   # exact: powers of two
    fp8 = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    num_groups = x.shape[0]
    head = _DESCRIPTOR.pack(ENCODING_FP8_E4M3, SOURCE_BFLOAT16, 0, num_groups, group_elems, 0)
    exp_bytes = exps.to(torch.int8).numpy().tobytes().ljust(_pad8(num_groups), b"\0")
    return b"".join((head, exp_bytes, fp8.numpy().tobytes()))


def _exponents(amax: torch.Tensor) -> torch.Tensor:
    """Per group the smallest k with amax * 2**-k <= FP8_MAX (0 for an all-zero group)."""
    _, exps = torch.frexp(amax / FP8_MAX)          # amax/448 = m * 2**e, m in [0.5, 1)
    exps = torch.where(amax > 0, exps, torch.zeros_like(exps))

    def fits(k: torch.Tensor) -> torch.Tensor:     # exact: scaling by a power of two
        return amax * torch.exp2(-k.float()) <= FP8_MAX

    # e is one too many where amax/448 is a power of two (m = 0.5), and the division rounds:
    # settle on the smallest k that fits
    exps = exps - fits(exps - 1).to(exps.dtype)
    exps = exps + (~fits(exps)).to(exps.dtype)
    return exps.clamp(*_EXP_RANGE)


def encoding_of(payload) -> int:
    """The encoding id a payload names (its first byte); BadPayload if it is empty."""
    if len(payload) < 1:
        raise BadPayload("empty encoded payload")
    return payload[0]


def decode_into(payload, out: memoryview) -> None:
    """Write the bf16 page an fp8 payload stands for into ``out`` (its raw length).

    Checks the descriptor against the payload's and ``out``'s lengths first; raises
    BadPayload on any mismatch (``out`` is then untouched)."""
    view = memoryview(payload).cast("B")
    if len(view) < DESCRIPTOR_LEN:
        raise BadPayload(f"payload of {len(view)} bytes is shorter than its descriptor")
    enc, source, rsv1, num_groups, group_elems, rsv2 = _DESCRIPTOR.unpack_from(view)
    if (enc, source, rsv1, rsv2) != (ENCODING_FP8_E4M3, SOURCE_BFLOAT16, 0, 0):
        raise BadPayload(f"descriptor (encoding {enc}, source {source}) is not fp8_e4m3 of bfloat16")
    if group_elems == 0 or group_elems % 2 or 2 * num_groups * group_elems != len(out):
        raise BadPayload(f"{num_groups} groups of {group_elems} do not make a page of {len(out)} bytes")
    if len(view) != DESCRIPTOR_LEN + _pad8(num_groups) + num_groups * group_elems:
        raise BadPayload(f"payload is {len(view)} bytes, its descriptor says otherwise")
    exps = np.frombuffer(view, dtype=np.int8, count=num_groups, offset=DESCRIPTOR_LEN)
    if exps.size and (exps.min() < _EXP_RANGE[0] or exps.max() > _EXP_RANGE[1]):
        raise BadPayload("scale exponent out of range")
    pairs = np.frombuffer(view, dtype="<u2", offset=DESCRIPTOR_LEN + _pad8(num_groups))
    dst = np.frombuffer(out, dtype="<u4")
    half = group_elems // 2
    for g, exp in enumerate(exps.tolist()):
        table = _pair_table(exp)
        for lo in range(g * half, (g + 1) * half, _SLICE_PAIRS):
            hi = min(lo + _SLICE_PAIRS, (g + 1) * half)
            table.take(pairs[lo:hi], out=dst[lo:hi], mode="clip")   # indices are < 65536 by type


@functools.lru_cache(maxsize=64)
def _pair_table(exp: int) -> np.ndarray:
    """uint32 table: entry (b1 << 8 | b0) holds the bf16 bits of fp8 byte b0 * 2**exp in its low
    half and of b1 * 2**exp in its high half (two little-endian bf16 elements)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    bits = (values * 2.0 ** exp).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    single = bits.astype(np.uint32)
    return ((single[:, None] << 16) | single[None, :]).reshape(-1)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8
