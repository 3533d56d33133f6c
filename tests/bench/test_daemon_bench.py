"""bench/daemon.py end to end at a tiny size: it must keep running as the code changes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_daemon_bench_runs_and_writes_every_part(tmp_path):
    out = tmp_path / "daemon.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "daemon.py"), "--iters", "5",
                           "--seconds", "0.3", "--machine", "test", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["in_process"]) >= {"lookup_128", "lookup_2048", "key_hashing_2048"}
    assert set(report["daemon"]) >= {"lookup_128", "lookup_2048", "store_128_new_pages"}
    assert all(report["throughput"][f"{n}_clients"]["timeouts"] == 0 for n in (1, 4, 8))
