"""bench/prefill.py on CPU at a tiny size: arguments and a whole run written to JSON.
Timings are recorded, never asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_prefill", ROOT / "bench" / "prefill.py")
prefill = importlib.util.module_from_spec(_spec)
sys.modules["bench_prefill"] = prefill
_spec.loader.exec_module(prefill)


def test_arguments_are_checked():
    args = prefill.parse_args([])
    assert args.contexts == [32768, 65536] and args.fraction == 0.9
    for argv in (["--contexts", "100"], ["--fraction", "1.0"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            prefill.parse_args(argv)


def test_tiny_run_writes_every_figure(tmp_path, monkeypatch):
    from decoder import attention

    # The tiny suffix (8 queries) is under the production threshold: take the split anyway.
    monkeypatch.setattr(attention, "SPLIT_MIN_QUERIES", 2)
    out = tmp_path / "p.json"
    result = prefill.main(["--device", "cpu", "--preset", "tiny", "--page-size", "8",
                           "--contexts", "80", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["points"][0]["context"] == 80
    row = result["points"][0]
    assert (row["cached_tokens"], row["computed_tokens"]) == (72, 8)
    for name in ("one_pass", "suffix_sdpa", "suffix_sdpa_lower_right"):
        assert row[name]["s"] > 0 and row[name]["tflops"] > 0
    assert set(row["layer_parts"]) == {"attention_sdpa", "attention_sdpa_lower_right", "kv_gather_s", "kv_gather_gbps"}
    # float32 on CPU: the split and the one-call kernel agree to rounding, and the split was taken
    assert row["logits_max_abs_diff_between_kinds"] < 1e-3 and row["same_first_token"]
    assert all(result["split_verdicts"].values()) and result["split_verdicts"]
