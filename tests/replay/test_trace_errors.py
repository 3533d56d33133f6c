"""Every trace error names the file and line (issue 8, point 10)."""

import json

import pytest

from kvstore.replay.trace import TraceFormatError, load_trace


def _trace(tmp_path, records):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"timestamp": 1, "hash_ids": [1, -2]}, "hash_ids must be ints in"),
    ({"timestamp": 1, "hash_ids": [2 ** 200]}, "hash_ids must be ints in"),
    ({"timestamp": -5, "hash_ids": [1]}, "'timestamp' must be a finite number of ms >= 0"),
    ({"timestamp": 1, "input_length": -3, "hash_ids": [1]}, "'input_length' must be an int >= 0"),
    ({"timestamp": 1, "output_length": 2.5, "hash_ids": [1]}, "'output_length' must be an int >= 0"),
])
def test_mooncake_errors_name_file_and_line(tmp_path, bad, message):
    path = _trace(tmp_path, [{"timestamp": 0, "input_length": 512, "hash_ids": [0]}, bad])
    with pytest.raises(TraceFormatError, match=rf"t\.jsonl:2: .*{message}"):
        load_trace(path)


def test_token_trace_negative_timestamp_names_the_line(tmp_path):
    path = _trace(tmp_path, [{"tokens": [1, 2, 3]}, {"timestamp": -1, "tokens": [1]}])
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:2: 'timestamp'"):
        load_trace(path, page_size=2)
