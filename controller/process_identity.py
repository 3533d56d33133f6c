"""Who a process is, in a way another process on the same host can check later.

A pid alone is not an identity: pids are reused, and a client in another pid
namespace (a container) reports a number that means another process here. A
process is named by (pid, start time in clock ticks since boot, pid namespace);
the daemon verifies a client's claim at Hello and, while the claim holds, can
tell at any moment whether that very process still exists. That is what lets it
keep the slots of a paused client (SIGSTOP, a debugger, a cgroup freeze) instead
of handing them to someone else while the paused process may still copy.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcessIdentity(NamedTuple):
    pid: int
    start_ticks: int
    """Field 22 of /proc/PID/stat; 0 when unknown."""
    pid_namespace: int
    """Inode of /proc/self/ns/pid; 0 when unknown."""


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def own_identity() -> ProcessIdentity:
    """This process's identity as the daemon should verify it."""
    return ProcessIdentity(os.getpid(), _start_ticks(os.getpid()) or 0, _pid_namespace())


def verify(claim: ProcessIdentity) -> bool:
    """True if ``claim`` names a live process that this process can watch: same pid
    namespace, and the pid's start time matches (not a reused pid)."""
    if not claim.start_ticks or not claim.pid_namespace or claim.pid_namespace != _pid_namespace():
        return False
    return _start_ticks(claim.pid) == claim.start_ticks


def is_alive(pid: int, start_ticks: int) -> bool:
    """Whether the process verified earlier as (pid, start_ticks) still exists (a zombie
    counts as gone: it can copy nothing)."""
    if _start_ticks(pid) != start_ticks:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")
