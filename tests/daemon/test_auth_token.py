"""The tcp token never goes on the command line, where `ps` shows it to every user
(issue 16, item 4): `--auth-token` is refused, saying how to pass it; the environment
and a token file work; an empty token is refused."""

import subprocess
import sys

import pytest

from controller.config import ConfigError
from controller.daemon.config import load_config
from daemon_proc import REPO, child_env, layout_args

LAYOUT_ENV = {"KVSTORE_LAYOUT_NUM_LAYERS": "2", "KVSTORE_LAYOUT_NUM_KV_HEADS": "2",
              "KVSTORE_LAYOUT_HEAD_DIM": "4", "KVSTORE_LAYOUT_PAGE_SIZE": "4"}
TCP = {"address": "tcp://127.0.0.1:7600"}


def test_serve_refuses_a_token_on_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--address",
                           "tcp://127.0.0.1:7600", "--auth-token", "s3cret", "--print-config",
                           *layout_args()], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "--auth-token-file" in proc.stderr and "KVSTORE_AUTH_TOKEN" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


def test_token_from_the_environment_or_a_file(tmp_path):
    config = load_config(environ={**LAYOUT_ENV, "KVSTORE_AUTH_TOKEN": "s3cret"}, flags=TCP)
    assert config.auth.read_token() == b"s3cret"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = load_config(environ=LAYOUT_ENV, flags={**TCP, "auth.token_file": str(token_file)})
    assert config.auth.read_token() == b"s3cret"


def test_an_empty_token_is_refused(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(environ=LAYOUT_ENV, flags={**TCP, "auth.token_file": str(token_file)})
    with pytest.raises(ConfigError, match="empty"):
        load_config(environ={**LAYOUT_ENV, "KVSTORE_AUTH_TOKEN": " "}, flags=TCP)
