"""Malformed daemon addresses fail at once, naming the form expected (issue 16, item 3),
the same way in connect_daemon, `kvstore status`, `kvstore serve` and the config file."""

import subprocess
import sys

import pytest

from controller.config import ConfigError
from controller.daemon.address import AddressError, parse_address
from controller.daemon.config import load_config
from daemon_proc import REPO, child_env, layout_args

BAD = ["tcp://127.0.0.1", "ipc://", "ipc:/x", "/tmp/kvstore.sock", "foo://bar",
       "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000", "tcp://127.0.0.1:http", "tcp://:7600",
       "ipc://relative/kvstore.sock", "ipc:///tmp/dir/", "ipc:///" + "x" * 120]


@pytest.mark.parametrize("address", BAD)
def test_parser_refuses_with_the_form_expected(address):
    with pytest.raises(AddressError) as err:
        parse_address(address)
    assert "expected ipc:///ABSOLUTE/PATH" in str(err.value) and "tcp://HOST:PORT" in str(err.value)


@pytest.mark.parametrize("address, host, port", [
    ("tcp://127.0.0.1:7600", "127.0.0.1", 7600), ("tcp://[::1]:9", "[::1]", 9),
    ("tcp://node-3.example:65535", "node-3.example", 65535), ("tcp://0.0.0.0:1", "0.0.0.0", 1)])
def test_parser_accepts_tcp(address, host, port):
    parsed = parse_address(address)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.url) == ("tcp", host, port, address)


def test_parser_accepts_ipc():
    parsed = parse_address("ipc:///run/user/1000/kvstore/kvstore.sock")
    assert (parsed.scheme, parsed.path) == ("ipc", "/run/user/1000/kvstore/kvstore.sock")


def _run(args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    # A hang (what main did) fails the test by timeout instead of hanging the suite.
    return subprocess.run([sys.executable, *args], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


CONNECT = """
import sys, time, torch
from controller import connect_daemon, ConfigError
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace
layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, dtype="float32")
start = time.monotonic()
try:
    connect_daemon(sys.argv[1], KeyNamespace("m", layout), torch.zeros(layout.pool_shape(4)))
except ConfigError as exc:
    print(f"{time.monotonic() - start:.3f}", exc)
"""


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "ipc://", "ipc:/x", "foo://bar"])
def test_connect_daemon_fails_at_once(address):
    proc = _run(["-c", CONNECT, address])
    assert proc.returncode == 0, proc.stderr
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 0.5 and "tcp://HOST:PORT" in message


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "ipc://", "/tmp/x.sock"])
def test_status_fails_at_once(address):
    proc = _run(["-m", "controller.cli", "status", "--address", address, "--timeout", "60"])
    assert proc.returncode == 1
    assert "kvstore status:" in proc.stderr and "tcp://HOST:PORT" in proc.stderr


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "ipc://", "tcp://127.0.0.1:99999"])
def test_serve_refuses(address):
    proc = _run(["-m", "controller.cli", "serve", "--address", address, *layout_args()])
    assert proc.returncode == 2, proc.stderr
    assert "kvstore serve:" in proc.stderr and "tcp://HOST:PORT" in proc.stderr


def test_config_file_address_checked(tmp_path):
    config = tmp_path / "kvstore.toml"
    config.write_text('address = "ipc:/run/kvstore.sock"\n[layout]\nnum_layers = 1\n'
                      'num_kv_heads = 1\nhead_dim = 4\npage_size = 4\n')
    with pytest.raises(ConfigError, match=r"ipc:///ABSOLUTE/PATH"):
        load_config(config, environ={})
