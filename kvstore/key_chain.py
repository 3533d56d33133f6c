"""The page-key chain in C (``csrc/key_chain.c``), built with the system's C compiler on first use.

Hashing one page costs two BLAKE2b compressions (the key block, then the
page), well under a microsecond in C; through ``hashlib`` each page also pays
for a Python call and two objects, which is most of its cost. The chain is
sequential (each key is the next page's BLAKE2b key), so nothing batches
across pages: the gain is doing the loop in C, one call per prompt.

Same keys byte for byte (tests/kvstore/test_page_keys.py holds the two to
it). Where no compiler is found or the build fails, :func:`load_key_chain`
returns None once, with a warning, and ``page_keys`` keeps the hashlib loop.

Cache: ``$KVSTORE_NATIVE_CACHE`` or ``~/.cache/kvstore/native``, one file per
(source digest, compiler), built under a temporary name and renamed into
place, so processes building at once do not see a half-written library.
``KVSTORE_KEY_HASH=python`` skips the build (the reference loop only).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

SOURCE = Path(__file__).parent / "csrc" / "key_chain.c"
KeyChainFn = Callable[[bytes, bytes, int, int], bytes]
"""(seed, data, page_bytes, num_pages) -> num_pages keys of 16 bytes, concatenated."""

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: list[KeyChainFn | None] = []  # empty: not tried yet


class BuildError(RuntimeError):
    """The C compiler was not found or failed."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise BuildError("no C compiler found (set CC, or install gcc)")


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + f"{cc}:{version}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("KVSTORE_NATIVE_CACHE", Path.home() / ".cache" / "kvstore" / "native"))
    return root / f"key_chain_{digest}.so"


def build() -> Path:
    """The compiled library's path, building it if this source and compiler have none yet."""
    cc = _compiler()
    path = _library_path(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        # Portable code (no -march=native): the cache directory may be shared by machines.
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _wrap(lib: ctypes.CDLL) -> KeyChainFn:
    fn = lib.kvstore_key_chain
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]
    fn.restype = None

    def key_chain(seed: bytes, data: bytes, page_bytes: int, num_pages: int) -> bytes:
        if len(seed) != 16 or page_bytes <= 0 or len(data) < page_bytes * num_pages:
            raise ValueError("key_chain: seed must be 16 bytes and data hold num_pages pages")
        out = ctypes.create_string_buffer(16 * num_pages)
        fn(seed, data, page_bytes, num_pages, out)  # ctypes releases the GIL for the call
        return out.raw

    return key_chain


def load_key_chain() -> KeyChainFn | None:
    """The C chain, built on first call; None (warned once) where it cannot be had."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_try_load())
    return _loaded[0]


def _try_load() -> KeyChainFn | None:
    if os.environ.get("KVSTORE_KEY_HASH", "").lower() == "python":
        return None
    if sys.byteorder != "little":  # the C reads message words in host order
        _log.warning("page keys: big-endian host, hashing with hashlib")
        return None
    try:
        return _wrap(ctypes.CDLL(str(build())))
    except (BuildError, OSError) as e:
        _log.warning("page keys: the C key chain is unavailable (%s); hashing with hashlib, "
                     "about 3x slower per page", e)
        return None
