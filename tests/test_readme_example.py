"""The README's Python examples run as written (issue 8, point 11; issue 16: connect_daemon)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from controller.daemon.launch import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README lost its marked Python example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "6 pages cached: 6 from L2, 0 from L3" in proc.stdout
    assert "num_l2_hit_pages=6" in proc.stdout


def _serve_command_of_readme(readme: str) -> list[str]:
    """The README's first `kvstore serve --layout-...` command line, as arguments."""
    match = re.search(r"^kvstore serve (--layout-.*?)(?<!\\)$", readme, re.S | re.M)
    assert match, "README lost its `kvstore serve --layout-...` example"
    return shlex.split(match.group(1).replace("\\\n", " "), comments=True)


def _flags_without(args: list[str], drop: set[str]) -> list[str]:
    out, it = [], iter(args)
    for arg in it:
        if arg in drop:
            next(it)
        else:
            out.append(arg)
    return out


def test_readme_daemon_example_runs_against_the_readme_serve_command(tmp_path):
    """The connect_daemon example runs as written against a real `kvstore serve`, started
    with the README's command line (host pool made small enough for a test machine)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-daemon-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README lost its marked connect_daemon example"
    script = tmp_path / "daemon_example.py"
    script.write_text(match.group(1))
    address = f"ipc://{tmp_path / 'run' / 'kvstore.sock'}"
    args = _flags_without(_serve_command_of_readme(readme), {"--host-pool-pages", "--metrics-port"})
    assert "--layout-num-layers" in args and "--layout-dtype" in args
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", *args,
                               "--host-pool-pages", "64", "--address", address],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(address, daemon, timeout_s=60)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**env, "KVSTORE_ADDRESS": address})
        assert proc.returncode == 0, proc.stderr
        assert "6 pages stored" in proc.stdout
        assert "6 pages loaded; daemon up: True" in proc.stdout
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
