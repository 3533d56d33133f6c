import subprocess
import sys

from controller.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout and "bench" in out.stdout


def test_demo_runs_and_shows_hits_from_l2_and_disk(capsys):
    assert main(["demo", "--preset", "tiny", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "bit for bit: yes" in out
    summary = [line for line in out.splitlines() if "prompt tokens:" in line][0]
    l2 = int(summary.split(" from L2")[0].split(":")[1])
    disk = int(summary.split(" from disk")[0].split("), ")[1])
    assert l2 > 0 and disk > 0


def test_unknown_command_is_an_error():
    out = run_cli("fly")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
