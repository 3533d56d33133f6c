"""A client that cannot map the daemon's segment gets CacheError saying why (issue 16,
item 3): not visible here (another host, a private /dev/shm), or another user's."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.api import CacheError
from daemon_proc import REPO, child_env, device_pool, running_daemon

ATTACH = """
import sys
from controller.api import CacheError
from daemon_proc import NAMESPACE, device_pool
from controller.client import DaemonClient
try:
    DaemonClient(sys.argv[1], NAMESPACE, device_pool(), request_timeout_s=5.0).close()
    print("attached")
except CacheError as exc:
    print("CacheError:", exc)
"""


def test_segment_not_visible_is_a_cache_error(tmp_path):
    with running_daemon(tmp_path) as daemon:
        segment = Path("/dev/shm") / daemon.stats()["segment"]
        hidden = segment.with_name(segment.name + ".hidden")
        segment.rename(hidden)   # what a client on another host or with its own /dev/shm sees
        try:
            with pytest.raises(CacheError, match="share its /dev/shm") as err:
                daemon.client(device_pool(), request_timeout_s=5.0)
            assert str(segment) in str(err.value)
        finally:
            hidden.rename(segment)
        daemon.client(device_pool(), request_timeout_s=5.0).close()   # and now it maps


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to make the segment another user's")
def test_segment_of_another_user_is_a_cache_error(tmp_path):
    with running_daemon(tmp_path) as daemon:
        segment = Path("/dev/shm") / daemon.stats()["segment"]
        os.chown(segment, 65534, 65534)   # mode stays 0600: nobody's now
        try:
            # root without the capabilities that override file permissions: a plain other user
            drop = "-dac_override,-dac_read_search"
            proc = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}",
                                   sys.executable, "-c", ATTACH, daemon.address],
                                  env=child_env(PYTHONPATH=f"{REPO}:{REPO / 'tests' / 'daemon'}"),
                                  cwd=REPO, capture_output=True, text=True, timeout=60)
        finally:
            os.chown(segment, 0, 0)
        assert proc.returncode == 0, proc.stderr
        assert "CacheError: no permission to map" in proc.stdout, proc.stdout + proc.stderr
        assert "owned by uid 65534" in proc.stdout and "as the daemon's user" in proc.stdout
