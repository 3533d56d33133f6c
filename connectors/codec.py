"""The L3 value format: a checked, optionally compressed frame around one page.

Every value an L3 store holds is one frame::

    offset  size  field
    0       4     magic b"KVL3"
    4       1     format version (2; 3 for an encoded page, see Encodings)
    5       1     codec id (CODECS)
    6       1     element size the byte shuffle used (1 = no shuffle)
    7       1     checksum kind (1 = XXH3-64)
    8       8     raw length: bytes of the page once decoded
    16      8     payload length: bytes that follow the header
    24      8     fingerprint digest (blake2b-64 of the layout fingerprint)
    32      8     key digest (XXH3-64 of the key the value is stored under)
    40      8     XXH3-64 of header bytes [0, 40) followed by the payload
    48      ...   payload (the page, encoded by the codec)

All integers are little-endian. Bytes read back from a store are untrusted:
`decode_into` checks magic, version, codec, both lengths, the checksum, the
fingerprint and the key *before* any decompressor runs, bounds the decompressor's output
by the raw length, and checks the decoded length again. Any mismatch raises
`FrameError` (or `FingerprintMismatch`), which the connector turns into a
counted miss; a bad frame is never returned as KV.

The key digest is why a value copied, renamed or written under the wrong key
(two swapped disk files, a writer that mixes keys up in a shared Redis) reads
as a miss (`KeyMismatch`) instead of another page's KV. Version 1 frames had
no key digest and are refused as an old format.

Why XXH3-64 (the xxhash package): measured at ~58 GB/s per core on the dev
box, against 4.3 GB/s for zlib's CRC-32, 3.6 for Adler-32 and 0.9 for
BLAKE2b. CRC-32 was the first choice (standard library) but it was slower than
loopback Redis itself (~3.4 GB/s for one 2 MiB SET), so it cost a put more
than half its speed; XXH3 makes the check cost ~1/15 of a memcpy. A 64-bit
hash misses a random corruption with probability 2**-64. It is an integrity
check, not a MAC: the store is trusted not to be malicious, only not to be
perfect (and never pickled: the payload is raw page bytes).

Encodings. A version 2 frame holds the page itself (``lossless``, what every
writer wrote before encodings existed, and still the default). A version 3
frame has the same header and an *encoded* page as its payload, which begins
with a descriptor naming its encoding (``fp8_e4m3``: connectors/fp8.py, lossy,
about half the bytes; codec none only). The raw length is always the decoded
page's. A reader is configured with one encoding and takes only frames of it:
a frame of another encoding is `EncodingMismatch`, a counted miss, never a page
decoded the wrong way.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash
import zstandard

MAGIC = b"KVL3"
FORMAT_VERSION = 2          # the page itself (lossless)
ENCODED_FORMAT_VERSION = 3  # an encoded page, its payload led by a descriptor (see Encodings)
_HEADER = struct.Struct("<4sBBBBQQ8sQQ")
HEADER_LEN = _HEADER.size  # 48
_SUM_OFFSET = HEADER_LEN - 8
CHECKSUM_XXH3_64 = 1

# name -> wire id. Ids are part of the stored format: never renumber.
CODECS: dict[str, int] = {
    "none": 0,
    "lz4": 1,
    "shuffle_lz4": 2,
    "zstd": 3,
    "shuffle_zstd": 4,
}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
_SHUFFLED = {CODECS["shuffle_lz4"], CODECS["shuffle_zstd"]}
ZSTD_LEVEL = 1

# name -> id, the first payload byte of a version 3 frame (0: a version 2 frame). Never renumber.
ENCODINGS: dict[str, int] = {
    "lossless": 0,
    "fp8_e4m3": 1,
}
LOSSLESS = ENCODINGS["lossless"]


class FrameError(ValueError):
    """A stored value is not a valid frame (corrupt, truncated, wrong size)."""


class FingerprintMismatch(FrameError):
    """A valid frame written for another layout fingerprint."""


class KeyMismatch(FrameError):
    """A valid frame stored under another key than the one it was written for."""


class SizeMismatch(FrameError):
    """A valid frame whose page length differs from the caller's buffer."""


class EncodingMismatch(FrameError):
    """A valid frame of another encoding than the reader's (e.g. fp8 read as lossless)."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The decoded header of one frame (see the module docstring)."""

    version: int
    codec: int
    elem_size: int
    raw_len: int
    payload_len: int
    fingerprint: bytes
    key_digest: int
    checksum: int


def fingerprint_digest(fingerprint: str) -> bytes:
    """The 8-byte digest of a layout fingerprint stored in every header."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=8).digest()


def key_digest(key: bytes) -> int:
    """The 64-bit digest of a store key written into every header."""
    return xxhash.xxh3_64_intdigest(key)


def encoding_id(name: str) -> int:
    """Id of an encoding name; raises ValueError naming the valid ones."""
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; use one of {sorted(ENCODINGS)}") from None


def codec_id(name: str) -> int:
    """Wire id of a codec name; raises ValueError naming the valid ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; use one of {sorted(CODECS)}") from None


def checksum(head, payload) -> int:
    """XXH3-64 of the first 40 header bytes followed by the payload."""
    h = xxhash.xxh3_64(head[:_SUM_OFFSET])
    h.update(payload)
    return h.intdigest()


# ---------------------------------------------------------------- shuffle
def _shuffle(raw: memoryview, elem_size: int) -> np.ndarray:
    """Byte-transpose: all first bytes of each element, then all second bytes...

    raw   = a0 a1 | b0 b1 | c0 c1 | t        (elem_size 2, tail t unshuffled)
    out   = a0 b0 c0 | a1 b1 c1 | t
    For bf16 this puts the sign+exponent bytes together, which compress.
    (Column copies: numpy's strided 2-D transpose is ~10x slower.)
    """
    src = np.frombuffer(raw, dtype=np.uint8)
    n = len(src) // elem_size
    out = np.empty(len(src), dtype=np.uint8)
    if elem_size == 2:   # the bf16/fp16 fast path: two vector ops over uint16
        words = src[: 2 * n].view("<u2")
        np.bitwise_and(words, 0xFF, out=out[:n], casting="unsafe")
        np.right_shift(words, 8, out=out[n: 2 * n], casting="unsafe")
    else:
        cols = src[: n * elem_size].reshape(n, elem_size)
        for j in range(elem_size):
            out[j * n:(j + 1) * n] = cols[:, j]
    out[n * elem_size:] = src[n * elem_size:]
    return out


def _unshuffle_into(src: bytes, dst: memoryview, elem_size: int) -> None:
    s = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    n = len(s) // elem_size
    if elem_size == 2:
        words = d[: 2 * n].view("<u2")
        np.left_shift(s[n: 2 * n], 8, out=words, dtype=np.uint16)
        np.bitwise_or(words, s[:n], out=words, casting="unsafe")
    else:
        cols = d[: n * elem_size].reshape(n, elem_size)
        for j in range(elem_size):
            cols[:, j] = s[j * n:(j + 1) * n]
    d[n * elem_size:] = s[n * elem_size:]


# ---------------------------------------------------------------- codecs
_tls = threading.local()  # zstd contexts are not thread-safe: one per thread


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _compress(codec: int, data) -> bytes:
    if codec in (CODECS["lz4"], CODECS["shuffle_lz4"]):
        return lz4.block.compress(data, store_size=False)
    return _zstd_c().compress(data)


def _decompress(codec: int, payload, raw_len: int) -> bytes:
    """Decompress with the output bounded by raw_len; FrameError on any fault."""
    try:
        if codec in (CODECS["lz4"], CODECS["shuffle_lz4"]):
            out = lz4.block.decompress(payload, uncompressed_size=raw_len)
        else:
            if zstandard.frame_content_size(payload) != raw_len:
                raise FrameError("zstd frame content size != raw length")
            out = _zstd_d().decompress(payload, max_output_size=raw_len)
    except FrameError:
        raise
    except Exception as exc:  # lz4/zstd raise their own types on bad input
        raise FrameError(f"payload does not decompress: {exc}") from None
    if len(out) != raw_len:
        raise FrameError(f"decoded {len(out)} bytes, header says {raw_len}")
    return out


# ---------------------------------------------------------------- frames
class Frame:
    """One encoded value as two parts, so a backend that can send or write
    pieces never copies the page: `head` (the header) then `payload` (for
    codec none, a view of the caller's page itself)."""

    __slots__ = ("head", "payload")

    def __init__(self, head, payload) -> None:
        self.head, self.payload = head, payload

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def tobytes(self) -> bytes:
        """The whole frame as one new bytes object (one copy)."""
        return b"".join((self.head, self.payload))

    @classmethod
    def of(cls, data) -> "Frame":
        """Wrap already-framed (or arbitrary, for tests) bytes."""
        return cls(b"", data)


def encode(raw, codec: int, fingerprint: bytes, elem_size: int = 2, *, key: bytes = b"",
           encoding: int = LOSSLESS, group_elems: int = 0) -> Frame:
    """Frame one page without joining header and payload (see Frame).

    The payload is `raw` itself for codec none (no copy): it must not change
    until the frame is stored (if it does, the checksum makes the stored value
    a miss, never wrong KV). For the shuffling codecs `elem_size` is the dtype
    width (2 for bf16/fp16); other codecs ignore it. `key` is the store key
    the frame will be stored under (see the module docstring). An `encoding`
    other than lossless makes a version 3 frame of the encoded page (bf16 pages,
    scale groups of `group_elems` elements; codec none only); a page it cannot
    carry raises fp8.UnencodablePage.
    """
    raw = memoryview(raw).cast("B")
    version = FORMAT_VERSION
    if encoding != LOSSLESS:
        payload, elem_size, version = _encode_page(raw, codec, encoding, group_elems), 1, ENCODED_FORMAT_VERSION
    elif codec == CODECS["none"]:
        payload, elem_size = raw, 1
    elif codec in _SHUFFLED:
        payload = _compress(codec, _shuffle(raw, elem_size))
    elif codec in _CODEC_NAMES:
        payload, elem_size = _compress(codec, raw), 1
    else:
        raise ValueError(f"unknown codec id {codec}")
    if not 1 <= elem_size <= 255:
        raise ValueError(f"elem_size must be in 1..255, got {elem_size}")
    head = _HEADER.pack(MAGIC, version, codec, elem_size, CHECKSUM_XXH3_64,
                        len(raw), len(payload), fingerprint, key_digest(key), 0)
    return Frame(head[:_SUM_OFFSET] + checksum(head, payload).to_bytes(8, "little"), payload)


def _encode_page(raw: memoryview, codec: int, encoding: int, group_elems: int) -> bytes:
    from connectors import fp8   # torch, imported only where an encoding is used

    if encoding != ENCODINGS["fp8_e4m3"]:
        raise ValueError(f"unknown encoding id {encoding}")
    if codec != CODECS["none"]:
        raise ValueError("an encoded page is stored with codec none")
    return fp8.encode(raw, group_elems or len(raw) // 2)


def encode_frame(raw, codec: int, fingerprint: bytes, elem_size: int = 2, *, key: bytes = b"",
                 encoding: int = LOSSLESS, group_elems: int = 0) -> bytes:
    """One contiguous frame (header + payload) for one page."""
    return encode(raw, codec, fingerprint, elem_size, key=key, encoding=encoding,
                  group_elems=group_elems).tobytes()


def parse_header(frame, frame_len: int | None = None) -> FrameHeader:
    """Check the header of an untrusted frame (not the checksum).

    `frame` may hold only the header when `frame_len` gives the whole length.
    """
    view = memoryview(frame).cast("B")
    if frame_len is None:
        frame_len = len(view)
    if len(view) < HEADER_LEN or frame_len < HEADER_LEN:
        raise FrameError(f"value of {len(view)} bytes is shorter than a header")
    magic, ver, codec, es, kind, raw_len, pay_len, fp, kd, crc = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameError("bad magic: not a kvstore L3 value")
    if ver not in (FORMAT_VERSION, ENCODED_FORMAT_VERSION):
        raise FrameError(f"format version {ver}, this reader knows {FORMAT_VERSION} and "
                         f"{ENCODED_FORMAT_VERSION}")
    if codec not in _CODEC_NAMES or kind != CHECKSUM_XXH3_64 or es == 0:
        raise FrameError(f"bad codec {codec} / elem size {es} / checksum kind {kind}")
    if pay_len != frame_len - HEADER_LEN:
        raise FrameError(f"payload is {frame_len - HEADER_LEN} bytes, header says {pay_len}")
    if ver == ENCODED_FORMAT_VERSION and codec != CODECS["none"]:
        raise FrameError("an encoded frame with a compressing codec")
    if ver == FORMAT_VERSION and codec == CODECS["none"] and pay_len != raw_len:
        raise FrameError("codec none with payload length != raw length")
    return FrameHeader(ver, codec, es, raw_len, pay_len, fp, kd, crc)


def check_parts(head, payload, fingerprint: bytes, max_raw_len: int,
                key: bytes = b"") -> FrameHeader:
    """Verify a frame held as two buffers, its header and its payload (a
    backend that reads the payload straight into the caller's page keeps the
    header apart); everything but the decode. Raises as `check_frame`."""
    header = parse_header(head, HEADER_LEN + len(payload))
    if header.raw_len > max_raw_len:
        raise FrameError(f"raw length {header.raw_len} exceeds the limit {max_raw_len}")
    if checksum(head, payload) != header.checksum:
        raise FrameError("checksum mismatch")
    if header.fingerprint != fingerprint:
        raise FingerprintMismatch("value was written for another layout fingerprint")
    if header.key_digest != key_digest(key):
        raise KeyMismatch("value was written under another key (misplaced or swapped)")
    return header


def check_frame(frame, fingerprint: bytes, max_raw_len: int,
                key: bytes = b"") -> tuple[FrameHeader, memoryview]:
    """Verify everything but the decode; returns the header and payload view."""
    view = memoryview(frame).cast("B")
    payload = view[HEADER_LEN:]
    return check_parts(view[:HEADER_LEN], payload, fingerprint, max_raw_len, key), payload


def frame_encoding(header: FrameHeader, payload) -> int:
    """The encoding id of a checked frame: lossless for version 2, else its descriptor's."""
    if header.version == FORMAT_VERSION:
        return LOSSLESS
    if len(payload) < 1:
        raise FrameError("encoded frame without a payload")
    return payload[0]


def _check_encoding(header: FrameHeader, payload, encoding: int) -> None:
    found = frame_encoding(header, payload)
    if found != encoding:
        raise EncodingMismatch(f"frame of encoding {found}, the reader takes {encoding}")


def decode_into(frame, out: memoryview, fingerprint: bytes, max_raw_len: int,
                key: bytes = b"", encoding: int = LOSSLESS) -> None:
    """Decode an untrusted frame into `out`, whose length must be the raw length.

    Raises FrameError / FingerprintMismatch / EncodingMismatch; `out` is then unspecified.
    """
    view = memoryview(frame).cast("B")
    decode_parts_into(view[:HEADER_LEN], view[HEADER_LEN:], out, fingerprint, max_raw_len, key, encoding)


def decode_parts_into(head, payload, out: memoryview, fingerprint: bytes, max_raw_len: int,
                      key: bytes = b"", encoding: int = LOSSLESS) -> None:
    """`decode_into` for a frame held as two buffers (see `check_parts`).

    `payload` may be `out` itself, the same object (a backend read the payload
    straight into the page): a codec-none page is then checked in place, not
    copied, and a compressed or encoded one is decoded out of it before `out` is written.
    """
    in_place = payload is out
    out = memoryview(out).cast("B")
    header = check_parts(head, payload, fingerprint, max_raw_len, key)
    if header.raw_len != len(out):
        raise SizeMismatch(f"page is {header.raw_len} bytes, buffer is {len(out)}")
    _check_encoding(header, payload, encoding)
    if header.version == ENCODED_FORMAT_VERSION:
        _decode_page_into(bytes(payload) if in_place else payload, out)
        return
    if header.codec == CODECS["none"]:
        if not in_place:
            out[:] = payload
        return
    data = _decompress(header.codec, payload, header.raw_len)
    if header.codec in _SHUFFLED:
        _unshuffle_into(data, out, header.elem_size)
    else:
        out[:] = data


def _decode_page_into(payload, out: memoryview) -> None:
    from connectors import fp8

    try:
        fp8.decode_into(payload, out)
    except fp8.BadPayload as exc:
        raise FrameError(f"encoded payload: {exc}") from None


def decode(frame, fingerprint: bytes, max_raw_len: int, key: bytes = b"",
           encoding: int = LOSSLESS) -> bytes:
    """Decode an untrusted frame into new bytes (see `decode_into`)."""
    head, payload = check_frame(frame, fingerprint, max_raw_len, key)
    _check_encoding(head, payload, encoding)
    if head.version == ENCODED_FORMAT_VERSION:
        out = bytearray(head.raw_len)
        _decode_page_into(payload, memoryview(out))
        return bytes(out)
    if head.codec == CODECS["none"]:
        return bytes(payload)
    data = _decompress(head.codec, payload, head.raw_len)
    if head.codec not in _SHUFFLED or head.elem_size == 1:
        return data
    out = bytearray(head.raw_len)
    _unshuffle_into(data, memoryview(out), head.elem_size)
    return bytes(out)
