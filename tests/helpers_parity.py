"""Fixtures shared by the model-parity and distribution tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread, then restore the setting.

    Their tensors are far too small to gain from threads, while an oversubscribed machine (tests
    running beside other jobs) makes every multi-threaded GEMM wait on descheduled workers: a forward
    of a 2-layer, 64-wide model took 0.27 s on two threads and 1.3 ms on one under such load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
