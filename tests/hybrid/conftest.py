"""The decoder tests' helpers live next to this file under a unique name (decoder_fakes);
put this directory on sys.path so the test modules import them in any import mode.
(No __init__.py here: a package tests/decoder could shadow the real `decoder`.)"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine torch's
    second OpenMP thread waits on the other load (seen: 10x slower). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
