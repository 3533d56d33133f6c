"""bench/pipeline.py on CPU at its smallest: the workload plan, the connector wrapper, and a
whole (tiny) grid written to JSON with output identical to the no-cache run. Timings are
recorded, never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
pipeline = importlib.util.module_from_spec(_spec)
sys.modules["bench_pipeline"] = pipeline
_spec.loader.exec_module(pipeline)

TINY = ["--quick", "--sessions", "2", "--max-steps", "3", "--time-scale", "0.01",
        "--system-tokens", "96", "--doc-tokens", "64", "--output-tokens", "3", "--page-size", "16",
        "--host-pages", "8", "--policies", "sync,best_effort,wait_complete,timeout,auto"]


def test_plans_follow_the_generator_and_name_output_segments():
    args = pipeline.parse_args(TINY)
    plans = pipeline.build_plans(pipeline.workload_config(args), args.max_prompt, args.max_steps)
    assert 1 <= len(plans) <= 2 and all(1 <= len(p.outputs) <= 3 for p in plans)
    for p in plans:
        assert len(p.gaps_s) == len(p.outputs) and min(p.gaps_s) >= 0
        for seg_id, step in p.output_of.items():  # an output segment has its step's length
            later = next(s for s in p.segments if any(i == seg_id for i, _ in s))
            assert dict(later)[seg_id] == p.outputs[step]


def test_registered_connector_wraps_the_real_disk_connector(tmp_path):
    import connectors

    pipeline.register_connectors()
    conn = connectors.open_connector("bench_disk", path=str(tmp_path), capacity_bytes=1 << 20,
                                     latency_s=0.001)
    assert isinstance(conn, pipeline.DiskConnector) and conn.latency_s == 0.001


def test_quick_grid_writes_json_with_identical_output(tmp_path):
    out = tmp_path / "pipeline.json"
    assert pipeline.main([*TINY, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["all_identical"] is True
    assert data["machine"]["cpus"] >= 1 and "redis_latency" in data
    runs = {(r["l3"], r["policy"], r["hints"]) for r in data["runs"]}
    assert ("none", "sync", False) in runs and ("disk", "best_effort", True) in runs
    assert len(runs) == 11 and ("disk", "auto", True) in runs
    assert "disk" in data["target"]
    auto = data["auto_vs_best_fixed"]["disk"]
    assert auto["best_fixed"] and auto["ratio"] > 0 and "auto_hints_ratio" in auto
