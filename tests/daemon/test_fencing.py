"""Never a wrong byte: readers and writers paused (SIGSTOP) past the lease TTL at each
step of a load or a store, while another engine churns the same slots.

Each test runs a real daemon (a tiny host pool, a 1 s lease TTL), a churn process
that stores and evicts as fast as it can and checks what it loads, and one subject
process per step that stops itself there; the test keeps them stopped for three
TTLs, continues them, and checks: each subject ends with a correct result or a
reported failure, the churn and a final sweep over every prompt find 0 wrong bytes.

*Watched* subjects (same pid namespace as the daemon) keep their leases and
reservations while paused. *Unwatched* ones run in a pid namespace of their own
(``unshare --pid``, as a container would): their session ends, their loads are
caught by the slot generations (LoadError), their reserved slots are quarantined.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_proc import DaemonProcess, child_env, running_daemon, wait_until

WORKER = str(Path(__file__).with_name("fence_worker.py"))
PAUSE_S = 3.0
DAEMON_ARGS = ["--lease-ttl-s", "1.0", "--heartbeat-interval-s", "0.25", "--reservation-ttl-s", "0.5"]

pytestmark = pytest.mark.slow


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(),
                                   reason="needs root and unshare(1) for a client in its own pid namespace")


class Worker:
    def __init__(self, daemon: DaemonProcess, cwd: Path, role: str, *args: str,
                 own_pid_namespace: bool = False) -> None:
        cmd = [sys.executable, WORKER, daemon.address, role, *args]
        if own_pid_namespace:
            # sh is the namespace's pid 1 (which ignores SIGSTOP); python runs as its child.
            cmd = ["unshare", "--pid", "--fork", "sh", "-c", '"$@"; exit $?', "sh", *cmd]
        self.proc = subprocess.Popen(cmd, env=child_env(), cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().split()
        assert first and first[0] == "PID", (first, self.proc.stderr.read())
        self.pid = int(first[1])

    def is_stopped(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2] == "T"

    def result(self, timeout_s: float = 120.0) -> dict:
        out, err = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # Subjects pin 8 pages each (up to 56); the churn cycles through the rest.
    with running_daemon(tmp_path_factory.mktemp("fence"), host_pages=112, args=DAEMON_ARGS) as d:
        yield d


_seeds = itertools.count(1)

WATCHED = [("reader", "before_copy"), ("reader", "mid_load"), ("reader", "before_verify"),
           ("writer", "before_copy"), ("writer", "mid_copy"), ("writer", "before_commit"),
           ("writer", "slow_copy")]
UNWATCHED = [("reader", "before_copy"), ("reader", "mid_load"),
             ("writer", "mid_copy"), ("writer", "before_commit")]


def run_paused(daemon: DaemonProcess, tmp_path: Path, cases: list[tuple[str, str]],
               own_pid_namespace: bool = False) -> tuple[dict, str]:
    """Run one subject per (role, point) at once beside a churn process; keep the ones
    that stopped themselves stopped for three lease TTLs, continue them, and return
    ({(role, point): result}, what the daemon logged meanwhile). Checks that neither the
    churn nor its final sweep over every prompt stored (the subjects' too) saw a wrong
    byte, and the daemon's integrity."""
    log_start = len(daemon.log())
    seeds = {case: next(_seeds) for case in cases}
    churn = Worker(daemon, tmp_path, "churn", str(100 + min(seeds.values())), "180",
                   *map(str, seeds.values()))
    subjects = {case: Worker(daemon, tmp_path, case[0], str(seeds[case]), case[1],
                             own_pid_namespace=own_pid_namespace) for case in cases}
    paused = [w for (role, point), w in subjects.items() if point != "slow_copy"]
    for worker in paused:
        assert wait_until(worker.is_stopped, 120, 0.02), worker.proc.stderr.read()
    time.sleep(PAUSE_S)   # three lease TTLs, while the churn reuses every free slot
    for worker in paused:
        os.kill(worker.pid, signal.SIGCONT)
    results = {case: worker.result() for case, worker in subjects.items()}
    (tmp_path / "STOP").touch()
    totals = churn.result()
    print(f"churn: {totals}; subjects: {results}")   # shown with -s: the pages checked
    assert totals["stores"] > 0 and totals["wrong"] == 0 and totals["sweep"]["wrong"] == 0, totals
    daemon.check_integrity()
    return results, daemon.log()[log_start:]


def test_paused_watched_clients_keep_their_slots_and_see_their_own_bytes(daemon, tmp_path):
    """Readers keep their leases, writers their reservations, while paused: each resumes
    and finishes as if nothing happened; a slow live writer is reported, not reclaimed."""
    results, log = run_paused(daemon, tmp_path, WATCHED)
    for (role, point), result in results.items():
        if role == "reader":
            assert result == {"outcome": "ok", "pages": 8, "wrong": 0}, (point, result)
        else:
            assert result["outcome"] == "ok" and result["wrong"] == 0, (point, result)
    assert log.count("silent but its process lives") >= len(WATCHED) - 1, log
    assert "open for more than" in log


@needs_unshare
def test_paused_unwatched_clients_get_load_errors_and_quarantined_slots(daemon, tmp_path):
    """In a pid namespace of their own the daemon cannot tell paused from dead: readers'
    leases end and the churn reuses their slots, so the generations fail their loads
    (reported, not wrong bytes); writers copy into quarantined slots and publish nothing."""
    results, log = run_paused(daemon, tmp_path, UNWATCHED, own_pid_namespace=True)
    assert "cannot be watched" in log and "cannot watch its process" in log
    for (role, point), result in results.items():
        if role == "reader":
            assert result["outcome"] == "load_error", (point, result)
        else:
            assert result["outcome"] == "not_published" and result["wrong"] == 0, (point, result)
