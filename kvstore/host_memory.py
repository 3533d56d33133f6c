"""Does a host pool fit this machine? Checked before its segment is created.

A POSIX shm segment is sparse: creating one of any size succeeds, and its pages are
allocated when first touched. A pool larger than the machine's memory therefore
starts fine and fails later, far from the cause: the OOM killer takes the daemon or
an engine, or a store dies of SIGBUS when the shm filesystem (``/dev/shm``, often a
fraction of RAM, 64 MiB in a default container) runs out. So:

- larger than physical memory, or than the shm filesystem's free space: refused;
- larger than the memory available now (``MemAvailable``): a warning with the numbers
  (page cache and other processes may give way, or may not).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_GIB = float(1 << 30)


class HostMemoryError(ValueError):
    """A host pool cannot fit this machine; the message gives the numbers and the fix."""


@dataclass(frozen=True)
class HostMemory:
    """What this machine offers a host pool, in bytes (None: unknown here)."""

    physical_bytes: int | None
    available_bytes: int | None
    shm_free_bytes: int | None


def read_host_memory(shm_dir: str = SHM_DIR) -> HostMemory:
    """Physical memory, MemAvailable and the shm filesystem's free space, as far as known."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        physical = None
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        st = os.statvfs(shm_dir)
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = None
    return HostMemory(physical, available, shm_free)


def check_pool_fits(num_slots: int, slot_bytes: int, memory: HostMemory | None = None) -> None:
    """Refuse (HostMemoryError) or warn about a pool of ``num_slots`` slots of ``slot_bytes``
    as the module docstring says."""
    memory = memory if memory is not None else read_host_memory()
    size = num_slots * slot_bytes
    what = f"a host pool of {num_slots} pages of {slot_bytes / 2**20:.2f} MiB ({size / _GIB:.1f} GiB)"
    fits = max(1, (memory.physical_bytes or size) // (2 * slot_bytes))
    if memory.physical_bytes is not None and size > memory.physical_bytes:
        raise HostMemoryError(
            f"{what} exceeds this machine's physical memory ({memory.physical_bytes / _GIB:.1f} GiB): "
            f"it would be OOM-killed once filled; lower host_pool_pages (e.g. {fits} pages, half "
            "of the memory)")
    if memory.shm_free_bytes is not None and size > memory.shm_free_bytes:
        raise HostMemoryError(
            f"{what} exceeds the free space of {SHM_DIR} ({memory.shm_free_bytes / _GIB:.2f} GiB): "
            f"stores would die of SIGBUS once it fills; lower host_pool_pages to at most "
            f"{memory.shm_free_bytes // slot_bytes} or enlarge {SHM_DIR} (docker run --shm-size)")
    if memory.available_bytes is not None and size > memory.available_bytes:
        log.warning("%s exceeds the memory available now (%.1f GiB of %.1f GiB): the system may "
                    "swap or OOM-kill processes once it fills; lower host_pool_pages", what,
                    memory.available_bytes / _GIB, (memory.physical_bytes or 0) / _GIB)
