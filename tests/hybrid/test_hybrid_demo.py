"""``kvstore demo --hybrid`` at the tiny size: every turn bit-exact (the exit status), with
prefixes served from L2 and from the disk tier."""

import argparse
import re

from decoder.hybrid_demo import run


def test_demo_hybrid_tiny(tmp_path, capsys):
    args = argparse.Namespace(preset="tiny-hybrid", device="cpu", page_size=16, host_pages=24,
                              system_prompt=64, new_tokens=2, l3_dir=str(tmp_path), threads=1)
    assert run(args) == 0
    out = capsys.readouterr().out
    l2, disk = map(int, re.search(r"(\d+) prompt tokens from L2, (\d+) from disk", out).groups())
    assert l2 > 0 and disk > 0, out
    assert "bit for bit: yes" in out
