"""The hybrid tests run the tiny hybrid model on one torch thread: it gains nothing from
threads, and on a busy 2-core machine a second OpenMP thread waits on the other load."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
