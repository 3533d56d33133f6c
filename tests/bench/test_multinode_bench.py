"""bench/multinode.py on CPU at the tiny size over a real Redis Cluster: node B's request
is an L3 hit of what node A stored, its output equals the split cache-off run, and the
JSON says so. Timings are recorded, never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_multinode", ROOT / "bench" / "multinode.py")
multinode = importlib.util.module_from_spec(_spec)
sys.modules["bench_multinode"] = multinode
_spec.loader.exec_module(multinode)


@pytest.mark.parametrize("argv, message", [
    (["--stores", "disk"], "--stores"),
    (["--fraction", "1"], "--fraction"),
    (["--contexts", "100", "--page-size", "16"], "--contexts"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        multinode.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_over_a_redis_cluster(tmp_path):
    out = tmp_path / "multinode.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = multinode.main(["--preset", "tiny", "--page-size", "8", "--contexts", "64", "--reps", "1",
                               "--decode-steps", "2", "--stores", "redis_cluster", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    result = json.loads(out.read_text())
    if result["skipped"]:
        pytest.skip(result["skipped"][0]["reason"])
    assert code == 0
    (point,) = result["points"]
    assert point["cached_tokens"] == 56 and point["node_b_l3_hit_tokens"] == [56, 56]
    assert point["exact_vs_split_run"] and point["ttft_recompute_s"] > 0
    assert result["node_b_daemon"]["redis_cluster"]["num_l3_bad_values"] == 0
    assert result["auto"][0]["context"] == 64
