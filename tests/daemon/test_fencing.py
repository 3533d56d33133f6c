"""Never a wrong byte: readers and writers paused (SIGSTOP) past the lease TTL at each
step of a load or a store, while another engine churns the same slots.

Each case runs a real daemon (a tiny host pool, a 1 s lease TTL), a churn process
that stores and evicts as fast as it can and checks what it loads, and one subject
process that stops itself at a chosen point; the test keeps it stopped for three
TTLs, continues it, and checks: the subject ends with a correct result or a
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
    with running_daemon(tmp_path_factory.mktemp("fence"), host_pages=48, args=DAEMON_ARGS) as d:
        yield d


_seeds = itertools.count(1)


def run_case(daemon: DaemonProcess, tmp_path: Path, role: str, point: str,
             own_pid_namespace: bool = False) -> tuple[dict, str]:
    """(subject's result, what the daemon logged meanwhile) of one paused operation; checks
    that neither the churn nor its final sweep over every prompt stored (the subject's
    too) saw a wrong byte."""
    seed = next(_seeds)
    log_start = len(daemon.log())
    churn = Worker(daemon, tmp_path, "churn", str(100 + seed), "120", str(seed))
    subject = Worker(daemon, tmp_path, role, str(seed), point, own_pid_namespace=own_pid_namespace)
    if point != "slow_copy":
        assert wait_until(subject.is_stopped, 60, 0.02), subject.proc.stderr.read()
        time.sleep(PAUSE_S)   # three lease TTLs, while the churn reuses every free slot
        os.kill(subject.pid, signal.SIGCONT)
    result = subject.result()
    (tmp_path / "STOP").touch()
    totals = churn.result()
    assert totals["stores"] > 0 and totals["wrong"] == 0 and totals["sweep"]["wrong"] == 0, totals
    daemon.check_integrity()
    return result, daemon.log()[log_start:]


@pytest.mark.parametrize("point", ["before_copy", "mid_load", "before_verify"])
def test_paused_reader_keeps_its_leases_and_loads_the_right_bytes(daemon, tmp_path, point):
    result, log = run_case(daemon, tmp_path, "reader", point)
    assert result == {"outcome": "ok", "pages": 8, "wrong": 0}
    assert "silent but its process lives" in log


@pytest.mark.parametrize("point", ["before_copy", "mid_copy", "before_commit"])
def test_paused_writer_keeps_its_reservation_and_publishes_its_own_bytes(daemon, tmp_path, point):
    result, log = run_case(daemon, tmp_path, "writer", point)
    assert result["outcome"] == "ok" and result["wrong"] == 0, result
    assert "silent but its process lives" in log


def test_slow_live_writer_is_reported_not_reclaimed(daemon, tmp_path):
    result, log = run_case(daemon, tmp_path, "writer", "slow_copy")
    assert result["outcome"] == "ok" and result["wrong"] == 0, result
    assert "open for more than" in log


@needs_unshare
@pytest.mark.parametrize("point", ["before_copy", "mid_load"])
def test_unwatched_reader_paused_gets_a_load_error_not_wrong_bytes(daemon, tmp_path, point):
    result, log = run_case(daemon, tmp_path, "reader", point, own_pid_namespace=True)
    assert "cannot be watched" in log and "cannot watch its process" in log
    # Its leases ended and the churn reused the slots: the generations say so.
    assert result["outcome"] == "load_error", result


@needs_unshare
@pytest.mark.parametrize("point", ["mid_copy", "before_commit"])
def test_unwatched_writer_paused_lands_in_quarantined_slots(daemon, tmp_path, point):
    result, log = run_case(daemon, tmp_path, "writer", point, own_pid_namespace=True)
    assert "cannot watch its process" in log
    assert result["outcome"] == "not_published" and result["wrong"] == 0, result
