"""`kvstore bench hitrate` glue: table, JSON, tiers, plot errors, bad arguments."""

from __future__ import annotations

import argparse
import builtins
import json

import pytest

from kvstore.replay import cli as hitrate_cli
from kvstore.eviction import policy_names


@pytest.fixture
def trace_path(tmp_path):
    requests = [[0, 1, 2], [0, 3], [0, 1, 2, 4], [5], [0, 3, 6], [0, 1, 2, 4, 7]]
    p = tmp_path / "small.jsonl"
    p.write_text("".join(json.dumps({"timestamp": i, "hash_ids": ids}) + "\n"
                         for i, ids in enumerate(requests)))
    return str(p)


def cli(*argv: str) -> int:
    return hitrate_cli.main(list(argv))


def test_json_has_every_policy_and_belady_at_every_capacity(trace_path, capsys) -> None:
    assert cli("--trace", trace_path, "--capacity", "2,4", "--json", "--no-progress") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["requests"], doc["blocks"]) == (6, 18)
    assert doc["ideal"] == pytest.approx(10 / 18)
    names = {(r["policy"], r["capacity"]) for r in doc["results"]}
    assert names == {(p, c) for p in ["belady", *policy_names()] for c in (2, 4)}
    for r in doc["results"]:
        assert 0.0 <= r["hit_rate"] <= doc["ideal"]
        assert set(r) >= {"policy", "capacity", "hit_rate", "fraction_of_belady"}


def test_table(trace_path, capsys) -> None:
    assert cli("--trace", trace_path, "--capacity", "3", "--policy", "lru,prefix-lru") == 0
    out = capsys.readouterr().out
    assert "ceiling (infinite cache) 55.56%" in out
    assert "belady" in out and "prefix-lru" in out and "x)" in out


def test_tiers(trace_path, capsys) -> None:
    assert cli("--trace", trace_path, "--tiers", "L2=2,L3=4", "--policy", "lru", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tiers"] == {"L2": 2, "L3": 4}
    belady, lru = doc["results"]
    assert belady["policy"] == "belady" and belady["capacity"] == 6
    assert lru["hit_rate"] == pytest.approx(lru["l2_hit_rate"] + lru["l3_hit_rate"])


def test_agent_workload(capsys) -> None:
    assert cli("--workload", "agent", "--max-requests", "200", "--capacity", "500",
               "--policy", "lru", "--json") == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 200


def test_plot_without_matplotlib_says_how_to_install(trace_path, capsys, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli("--trace", trace_path, "--plot", "out.png") == 2
    assert "pip install 'kvstore[plot]'" in capsys.readouterr().err


def test_plot_is_written(trace_path, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curve.png"
    assert cli("--trace", trace_path, "--capacity", "2,4", "--policy", "lru", "--plot", str(out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [
    ["--capacity", "0"], ["--capacity", "ten"], ["--policy", "nope"], ["--tiers", "L2=5"],
    ["--tiers", "L1=5,L3=6"], ["--max-requests", "-5"], ["--max-requests", "0"], ["--page-size", "x"],
])
def test_bad_arguments_are_usage_errors(trace_path, argv) -> None:
    with pytest.raises(SystemExit) as e:
        cli("--trace", trace_path, *argv)
    assert e.value.code == 2


def test_missing_trace_file(tmp_path, capsys) -> None:
    assert cli("--trace", str(tmp_path / "none.jsonl")) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_a_block_id_wider_than_a_key_is_a_clear_error(tmp_path, capsys) -> None:
    path = tmp_path / "wide.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1,
                                "hash_ids": [2**128]}) + "\n")
    assert cli("--trace", str(path)) == 2
    assert "2**128" in capsys.readouterr().err


def test_add_arguments_mounts_on_any_parser() -> None:
    parser = argparse.ArgumentParser()
    hitrate_cli.add_arguments(parser)
    args = parser.parse_args(["--workload", "agent", "--capacity", "10"])
    assert args.capacity == [10] and args.policy is None
