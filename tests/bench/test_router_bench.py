"""bench/router.py at a tiny size: four real daemons, the event-driven router against round
robin, and the JSON it writes. Figures are recorded, never asserted; what must hold is:
both policies saw the same pages, every request was routed, and the router's
prediction from events matched the daemons' hits for most requests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow   # four daemon processes: ~20-30 s on a 2-core box
def test_router_bench_writes_both_hit_rates(tmp_path):
    out = tmp_path / "router.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "router.py"), "--sessions", "6",
                          "--host-pages", "60", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    prefix, rr = report["prefix_router"], report["round_robin"]
    assert prefix["num_pages"] == rr["num_pages"] > 0
    assert sum(prefix["requests_per_node"]) == sum(rr["requests_per_node"]) \
        == report["workload"]["num_requests"]
    assert 0 <= rr["hit_rate"] <= 1 and 0 <= prefix["hit_rate"] <= 1
    assert prefix["views_complete"]
    # The router's index comes from events only; a stale batch may cost a request its
    # exact prediction, never most of them.
    assert prefix["prediction_exact_fraction"] > 0.5
