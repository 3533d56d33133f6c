"""bench/fp8_l3.py on CPU at a tiny size: arguments and a whole run written to JSON.
Timings are recorded, never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_fp8_l3", ROOT / "bench" / "fp8_l3.py")
fp8_bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_fp8_l3"] = fp8_bench
_spec.loader.exec_module(fp8_bench)


def test_arguments_are_checked():
    args = fp8_bench.parse_args([])
    assert args.contexts == [16384, 32768] and args.decode_steps == 64 and args.fraction == 0.9
    for argv in (["--contexts", "100"], ["--fraction", "0"], ["--decode-steps", "0"]):
        with pytest.raises(SystemExit):
            fp8_bench.parse_args(argv)


def test_tiny_run_compares_fp8_with_lossless(tmp_path):
    out = tmp_path / "f.json"
    result = fp8_bench.main(["--device", "cpu", "--preset", "tiny", "--page-size", "8", "--contexts", "64",
                             "--decode-steps", "3", "--disk-dir", str(tmp_path), "--out", str(out)])
    row = json.loads(out.read_text())["points"][0]
    assert row == json.loads(json.dumps(result["points"][0], default=float))
    assert row["cached_tokens"] == 56 and row["lossless_equals_split_run"]
    assert row["lossless"]["l3_tokens"] == row["fp8_e4m3"]["l3_tokens"] == 56
    # tiny pages carry a visible header; the ratio is that of the frame sizes
    assert 0.5 < row["fp8_e4m3"]["l3_bytes_per_page_byte"] < 0.55 < row["lossless"]["l3_bytes_per_page_byte"]
    acc = row["accuracy"]
    assert acc["steps_compared"] >= 1 and 0 < acc["max_logit_abs_diff"] < 0.1 * acc["logit_abs_max"]
