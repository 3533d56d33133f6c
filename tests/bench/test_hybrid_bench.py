"""bench/hybrid.py's CPU smoke mode: the hits are what the points ask for (the bench asserts
it), the JSON has every figure, and the cache run (chunks of two pages) equals the
cache-off run cut where the hit and its store cut, bit for bit. Timings are recorded, never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_hybrid", ROOT / "bench" / "hybrid.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_hybrid"] = bench
_spec.loader.exec_module(bench)


def test_cpu_smoke(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = bench.main(["--device", "cpu", "--preset", "tiny-hybrid", "--page-size", "8", "--contexts",
                          "48", "--fractions", "0.5,1.0", "--chunk", "16", "--reps", "1",
                          "--out", str(tmp_path / "h.json")])
    finally:
        torch.set_num_threads(before)
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["points"] == out["points"] and len(out["points"]) == 2
    half, full = out["points"]
    assert (half["cached_tokens"], full["cached_tokens"]) == (24, 40)
    for point in out["points"]:
        assert point["bit_equal"] and point["snapshot_tier"] == "L2"
        # pages of one attention layer of four + one snapshot, against four layers' pages
        assert point["loaded_bytes"] == (point["cached_tokens"] // 8 * out["model"]["kv_page_bytes"]
                                         + out["model"]["snapshot_bytes"])
        assert point["dense_loaded_bytes"] == point["cached_tokens"] // 8 * out["model"]["dense_page_bytes"]
