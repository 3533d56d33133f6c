"""``kvstore demo --daemon`` end to end: a daemon, two engine processes, bit-exact outputs."""

import subprocess
import sys

from daemon_proc import REPO, child_env


def test_demo_with_daemon_shares_pages_between_engine_processes():
    cmd = [sys.executable, "-m", "controller.cli", "demo", "--daemon", "--preset", "tiny",
           "--system-prompt", "128", "--new-tokens", "2"]
    out = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bit for bit: yes" in out.stdout
    assert "engine B loaded" in out.stdout and "engine B loaded 0 " not in out.stdout
