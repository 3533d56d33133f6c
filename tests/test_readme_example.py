"""The README's Python example runs as written (issue 8, point 11)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README lost its marked Python example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "6 pages cached: 6 from L2, 0 from L3" in proc.stdout
    assert "num_l2_hit_pages=6" in proc.stdout
