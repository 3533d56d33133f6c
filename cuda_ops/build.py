"""Build ``csrc/kv_copy.cu`` into a shared library once, cache it, load it with ctypes.

Why not torch.utils.cpp_extension or Triton: the kernel file includes only
``cuda_runtime.h`` and exposes a C ABI, so one nvcc call for the running GPU's
architecture builds it in seconds (no torch headers, no ninja, no ABI coupling to
the torch build), and the same file holds the host-side copy-engine calls
(``cudaMemcpyBatchAsync``) that Triton can't express.

Cache: ``$KVSTORE_CUDA_CACHE`` or ``~/.cache/kvstore/cuda_ops``, one file per
(source digest, architecture, nvcc path); built under a temporary name and
renamed into place, so concurrent first uses never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "kv_copy.cu"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class BuildError(RuntimeError):
    """The CUDA library could not be built or loaded; the message says what to install or set."""


def find_nvcc() -> str:
    candidates = []
    for env in ("KVSTORE_NVCC",):
        if os.environ.get(env):
            candidates.append(os.environ[env])
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BuildError(
        "nvcc not found: install the CUDA toolkit or set CUDA_HOME (or KVSTORE_NVCC) "
        "to build the kvstore CUDA copy ops"
    )


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def library_path() -> Path:
    nvcc = find_nvcc()
    arch = _arch()
    # The toolkit's version is part of the key: an upgraded nvcc at the same path rebuilds.
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + f"{arch}:{nvcc}:{version}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("KVSTORE_CUDA_CACHE", Path.home() / ".cache" / "kvstore" / "cuda_ops"))
    return root / f"libkvcopy-sm{arch}-{digest}.so"


def _compile(out: Path) -> None:
    nvcc, arch = find_nvcc(), _arch()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [
        nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", tmp, str(SOURCE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)


def load_library() -> ctypes.CDLL:
    """The loaded library (built on first call, then cached on disk and in memory)."""
    global _lib
    with _lock:
        if _lib is None:
            path = library_path()
            if not path.exists():
                _compile(path)
            _lib = _declare(ctypes.CDLL(str(path)))
        return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
    lib.kv_copy_chunks.argtypes = [vp, vp, vp, vp, vp, i64, i32, i32, i64, i32, i32, i32, vp]
    lib.kv_copy_chunks.restype = i32
    lib.kv_memcpy_runs.argtypes = [vp, vp, vp, sz, i32, vp]
    lib.kv_memcpy_runs.restype = i32
    lib.kv_is_device_visible.argtypes = [vp]
    lib.kv_is_device_visible.restype = i32
    lib.kv_has_batch_memcpy.restype = i32
    lib.kv_runtime_version.restype = i32
    lib.kv_error_string.argtypes = [i32]
    lib.kv_error_string.restype = ctypes.c_char_p
    return lib
