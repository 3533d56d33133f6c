"""Opening the daemon's shared-memory segment in a client, with errors that say why not.

A client maps the daemon's host pool (a POSIX shm segment under /dev/shm), so it must
run on the daemon's node, as the daemon's user, in the same /dev/shm (a container
with a private /dev/shm sees none of it). Each way of getting that wrong becomes a
CacheError naming the cause and the fix, never a raw FileNotFoundError or PermissionError.
"""

from __future__ import annotations

import os
import re
from multiprocessing import shared_memory
from pathlib import Path

from controller.api import CacheError

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def attach_segment(name: str, num_bytes: int) -> shared_memory.SharedMemory:
    """Map the existing segment ``name`` (at least ``num_bytes`` long); the caller closes it.

    Never unlinks it: the daemon owns it (Python < 3.13 registers an attached segment
    with the resource tracker, which would remove it at exit, so it is unregistered)."""
    if not _NAME.fullmatch(name):  # it came over the socket: never a path
        raise CacheError(f"the daemon named its segment {name!r}, which is not a shm name; "
                         "is that a kvstore daemon?")
    try:
        try:
            shm = shared_memory.SharedMemory(name=name, track=False)
        except TypeError:  # Python < 3.13: no track argument
            from multiprocessing import resource_tracker

            shm = shared_memory.SharedMemory(name=name)
            resource_tracker.unregister(shm._name, "shared_memory")
    except FileNotFoundError:
        raise CacheError(
            f"the daemon's shared-memory segment {SHM_DIR / name} is not visible here: a client "
            "must run on the daemon's node and share its /dev/shm (not on another host, not in a "
            "container with a private /dev/shm); if the daemon just restarted, connect again") from None
    except PermissionError:
        raise CacheError(f"no permission to map the daemon's segment {SHM_DIR / name} "
                         f"({_owner(name)}; this process is uid {os.getuid()}): run the client "
                         "as the daemon's user") from None
    except OSError as exc:
        raise CacheError(f"cannot map the daemon's segment {SHM_DIR / name}: {exc}") from None
    if shm.size < num_bytes:
        shm.close()
        raise CacheError(f"the daemon's segment {SHM_DIR / name} holds {shm.size} bytes, fewer "
                         f"than the {num_bytes} its Hello announced: another process replaced it")
    return shm


def _owner(name: str) -> str:
    try:
        st = (SHM_DIR / name).stat()
    except OSError:
        return "owner unknown"
    return f"owned by uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}"
