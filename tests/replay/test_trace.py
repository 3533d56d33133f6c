"""Trace loading: the Mooncake format, our token format, detection and errors."""

from __future__ import annotations

import json

import pytest

from kvstore.page_keys import page_keys
from kvstore.replay import TraceFormatError, block_id_key, load_trace
from kvstore.replay.trace import _namespace_digest


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return str(path)


def test_mooncake_trace(tmp_path) -> None:
    p = write(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 7, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]},
    ])
    t = load_trace(p)
    assert (t.num_requests, t.num_blocks, t.num_distinct_blocks) == (2, 4, 3)
    assert t.requests[1].timestamp == 7.0
    assert t.requests[1].keys == (block_id_key(0), block_id_key(2))
    assert len(block_id_key(2)) == 16 and block_id_key(2) != block_id_key(3)
    assert load_trace(p, max_requests=1).num_requests == 1


def test_token_trace_uses_the_service_page_keys(tmp_path) -> None:
    tokens = list(range(40))
    p = write(tmp_path / "t.jsonl", [
        {"timestamp": 1, "tokens": tokens},
        {"timestamp": 2, "tokens": tokens[:20] + [99] * 20},
        {"tokens": tokens, "namespace": "other-model"},
    ])
    t = load_trace(p, page_size=16)
    a, b, c = (r.keys for r in t.requests)
    assert a == tuple(page_keys(_namespace_digest("default"), tokens, 16))
    assert len(a) == 2  # 40 tokens: two full pages of 16, the partial one gets no key
    assert b[0] == a[0] and b[1] != a[1]  # shared first page, different second
    assert not set(c) & set(a)  # namespaces never share pages
    assert t.requests[2].timestamp == 3.0  # default: the line number


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"hash_ids": [1, "x"]}', "hash_ids"),
    ('{"hash_ids": [1], "timestamp": "soon"}', "timestamp"),
    ('{"prompt": "hi"}', "neither"),
])
def test_bad_lines_name_the_problem(tmp_path, line, message) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(TraceFormatError, match=message):
        load_trace(p)


def test_bad_tokens_are_rejected(tmp_path) -> None:
    p = write(tmp_path / "t.jsonl", [{"tokens": [1, -5]}])
    with pytest.raises(TraceFormatError, match="t.jsonl:1"):
        load_trace(p, page_size=1)


def test_unknown_format(tmp_path) -> None:
    with pytest.raises(ValueError, match="format"):
        load_trace(write(tmp_path / "t.jsonl", [{"hash_ids": [1]}]), fmt="csv")
