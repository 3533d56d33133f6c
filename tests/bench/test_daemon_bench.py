"""bench/daemon.py end to end at a tiny size: it must keep running as the code changes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_daemon_bench_runs_and_writes_every_part(tmp_path):
    out = tmp_path / "daemon.json"
    log = tmp_path / "daemon.log"
    # The caller's PYTHONPATH holds this interpreter's packages only through the venv; the
    # bench must pass it on to its daemon and workers whatever it is.
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "daemon.py"), "--iters", "5",
                           "--seconds", "0.3", "--machine", "test", "--out", str(out),
                           "--sizes", "128", "512", "--clients", "1", "2", "--store-prompts", "5",
                           "--daemon-log", str(log)],
                          capture_output=True, text=True, timeout=280, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for n in ("128", "512"):
        assert set(report["embedded"][n]) == {"repeat", "cold_key_hashing", "index_work"}
        assert report["daemon"][n]["repeat"]["n"] >= 5
        assert report["zmq_echo"][n]["p50_us"] > 0
        assert report["daemon_over_echo_p50"][n] > 0
        assert report["daemon"][n]["repeat"]["cpu_us_per_call"] > 0
    assert "store_128_new_pages" in report["embedded"] and "store_128_new_pages" in report["daemon"]
    for n in (1, 2):
        assert report["throughput"][f"{n}_clients"]["hit_lookups_per_s"] > 0
    assert log.exists()
